"""DatasetGAN's style interpreter: generator feature taps, a factorized pixel-classifier ensemble, uncertainty, training."""

from labelfactory.interpreter.ensemble import EnsembleConfig, FactorizedEnsemble, PixelEnsemble, majority_vote
from labelfactory.interpreter.labeller import MODEL_FILE, Interpreter, Labelled, generator_identity, load_interpreter, save_interpreter
from labelfactory.interpreter.records import LatentRecord, latent_from_info
from labelfactory.interpreter.taps import TapLayout, generate_with_taps, sample_taps, ws_from_seeds, ws_from_w
from labelfactory.interpreter.train import TrainConfig, train_ensemble
from labelfactory.interpreter.uncertainty import image_score, js_divergence

__all__ = [
    "EnsembleConfig", "FactorizedEnsemble", "PixelEnsemble", "majority_vote",
    "MODEL_FILE", "Interpreter", "Labelled", "generator_identity", "load_interpreter", "save_interpreter",
    "LatentRecord", "latent_from_info", "TapLayout", "generate_with_taps", "sample_taps", "ws_from_seeds", "ws_from_w",
    "TrainConfig", "train_ensemble", "image_score", "js_divergence",
]
