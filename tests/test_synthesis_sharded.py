"""`labelfactory synthesize` under torchrun: seeds split over gloo ranks, the folder byte-equal to one process's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from labelfactory.cli import main
from labelfactory.datasetgan import EnsembleConfig, PixelEnsemble, TapLayout, save_interpreter
from labelfactory.datasetgan.synthesis import shard_seeds
from labelfactory.labels import LABEL_NAMES
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.networks import Generator

KW = dict(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32, mapping_layers=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny generator file and a random interpreter file beside it."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    publish_generator(Generator(**KW).eval(), KW, d / "stylegan2.pt", config={}, data={}, kimg=0.0)
    layout = TapLayout.of(load_generator(d / "stylegan2.pt"))
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, 32, 12, members=3, hidden=(8, 8)))
    save_interpreter(d / "datasetgan.pt", ens.eval(), LABEL_NAMES, {}, {}, load_generator(d / "stylegan2.pt"))
    return d


def synthesize_args(models, out, seeds: str) -> list[str]:
    return ["synthesize", "--generator", str(models / "stylegan2.pt"), "--out", str(out), "--seeds", seeds]


def torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "-m", "labelfactory.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def folder_bytes(root) -> dict[str, bytes]:
    """Every file's bytes; a .seg.nrrd's without the time pynrrd writes into its header (it differs run to run)."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {k: re.sub(rb"\n# on [^\n]*\(GMT\)\.\n", b"\n", v, count=1) for k, v in files.items()}


def test_shards_take_every_worlds_block_and_cover_the_seeds_once():
    seeds = [9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 20]
    shards = [shard_seeds(seeds, r, 3) for r in range(3)]
    assert shards == [[9, 0, 3, 6], [1, 4, 7, 20], [2, 5, 8]]  # the seeds' own order within a shard
    assert shard_seeds(list(range(10)), 1, 2, block=4) == [4, 5, 6, 7]  # blocks 0 and 8.. to rank 0
    assert shard_seeds([5], 1, 2) == [] and shard_seeds(seeds, 0, 1) == seeds


@pytest.mark.slow
def test_two_ranks_make_the_folder_one_process_makes_byte_for_byte(models, tmp_path):
    args = ["--drop-fraction", "0.3", "--no-progress", "--block", "4"]  # blocks 0-3, 4-7, 8-10
    assert main([*synthesize_args(models, tmp_path / "one", "0-10"), *args]) == 0
    proc = torchrun([*synthesize_args(models, tmp_path / "two", "0-10"), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("synthesize: 11 new pairs; 8 kept, 3 dropped") == 1  # rank 0 reports for all
    assert "rank 0 of 2 makes 7 of the 11" in proc.stderr and "rank 1 of 2 makes 4 of the 11" in proc.stderr
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert len(one) > 40 and one.keys() == two.keys() and one == two  # pairs, records, manifests, preview


@pytest.mark.slow
def test_a_sharded_run_stopped_before_its_merge_is_resumed(models, tmp_path):
    args = ["--drop-fraction", "0.25", "--no-progress"]
    assert main([*synthesize_args(models, tmp_path / "one", "0-7"), *args]) == 0
    # a 2-rank run of seeds 0-3 that stopped after writing its pairs and rank files, before rank 0 merged them
    assert main([*synthesize_args(models, tmp_path / "two", "0-3"), *args]) == 0
    records = (tmp_path / "two" / "records.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two" / "records.jsonl").unlink()
    (tmp_path / "two" / "records.rank0.jsonl").write_text("".join(records[0::2]))
    (tmp_path / "two" / "records.rank1.jsonl").write_text("".join(records[1::2]))
    proc = torchrun([*synthesize_args(models, tmp_path / "two", "0-7"), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synthesize: 4 new pairs" in proc.stdout and not list((tmp_path / "two").glob("records.rank*"))
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert one.keys() == two.keys() and {k: v for k, v in one.items() if k != "records.jsonl"} == {
        k: v for k, v in two.items() if k != "records.jsonl"
    }
    assert sorted(two["records.jsonl"].splitlines()) == sorted(one["records.jsonl"].splitlines())
