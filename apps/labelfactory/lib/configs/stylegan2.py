"""StyleGAN2-ADA (the DatasetGAN image source): trainer `stylegan2`, model file stylegan2.pt.

Conf: stylegan2_preset (auto | paper256 | demo; auto = paper256 with a GPU, demo on CPU),
stylegan2_resolution, stylegan2_total_kimg, stylegan2_snapshot_kimg, stylegan2_fid_kimg,
stylegan2_batch_size, stylegan2_fid_weights (path to pytorch-fid's Inception weights).
"""

from monailabel.interfaces.config import TaskConfig

from labelfactory.gan.config import preset
from labelfactory.tasks.stylegan2 import StyleGAN2Train


class StyleGAN2(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        base = preset(conf.get("stylegan2_preset", "auto"))
        get = lambda key, cast: cast(conf[f"stylegan2_{key}"]) if conf.get(f"stylegan2_{key}") not in (None, "") else None  # noqa: E731
        self.defaults = base.with_overrides(resolution=get("resolution", int), total_kimg=get("total_kimg", float), snapshot_kimg=get("snapshot_kimg", float),
                                            fid_kimg=get("fid_kimg", float), batch_size=get("batch_size", int))
        self.fid_weights = conf.get("stylegan2_fid_weights") or None

    def infer(self):
        return {}

    def trainer(self):
        return {"stylegan2": StyleGAN2Train(self.model_dir, self.defaults, self.fid_weights)}
