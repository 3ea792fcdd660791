"""DatasetGAN's style interpreter: generator feature taps, a factorized pixel-classifier ensemble, uncertainty."""

from labelfactory.datasetgan.ensemble import EnsembleConfig, FactorizedEnsemble, PixelEnsemble, majority_vote
from labelfactory.datasetgan.labeller import MODEL_FILE, Interpreter, Labelled, load_interpreter, save_interpreter
from labelfactory.datasetgan.records import LatentRecord
from labelfactory.datasetgan.taps import TapLayout, generate_with_taps, sample_taps, ws_from_seeds, ws_from_w
from labelfactory.datasetgan.train import DatasetGANConfig, train_ensemble
from labelfactory.datasetgan.uncertainty import image_score, js_divergence

__all__ = [
    "MODEL_FILE",
    "EnsembleConfig",
    "FactorizedEnsemble",
    "Interpreter",
    "Labelled",
    "LatentRecord",
    "PixelEnsemble",
    "TapLayout",
    "DatasetGANConfig",
    "generate_with_taps",
    "image_score",
    "js_divergence",
    "load_interpreter",
    "majority_vote",
    "sample_taps",
    "save_interpreter",
    "train_ensemble",
    "ws_from_seeds",
    "ws_from_w",
]
