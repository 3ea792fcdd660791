"""DatasetGAN's style interpreter: generator feature taps, a factorized pixel-classifier ensemble, uncertainty."""

from labelfactory.interpreter.ensemble import EnsembleConfig, FactorizedEnsemble, PixelEnsemble, majority_vote
from labelfactory.interpreter.labeller import MODEL_FILE, Interpreter, Labelled, load_interpreter, save_interpreter
from labelfactory.interpreter.records import LatentRecord
from labelfactory.interpreter.taps import TapLayout, generate_with_taps, sample_taps, ws_from_seeds, ws_from_w
from labelfactory.interpreter.train import TrainConfig, train_ensemble
from labelfactory.interpreter.uncertainty import image_score, js_divergence

__all__ = [
    "MODEL_FILE",
    "EnsembleConfig",
    "FactorizedEnsemble",
    "Interpreter",
    "Labelled",
    "LatentRecord",
    "PixelEnsemble",
    "TapLayout",
    "TrainConfig",
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
