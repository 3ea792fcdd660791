"""DatasetGAN: trainer `interpreter` (model file interpreter.pt), infers `datasetgan` (mask of a
generated image) and `synthesis` (a new image + mask from a seed), next-sample strategy
`generated_uncertain` and scoring `generated_uncertainty`.

Conf: interpreter_members (10), interpreter_max_epochs (30), interpreter_pixels_per_image (1024),
interpreter_lr (0.001), candidates (K new images scored per next sample, 8), truncation_psi (0.7).
"""

from monailabel.interfaces.config import TaskConfig

from labelfactory.interpreter.train import TrainConfig
from labelfactory.tasks.active_learning import GeneratedUncertain, GeneratedUncertainty
from labelfactory.tasks.interpreter import DatasetGANInfer, InterpreterModels, InterpreterTrain
from labelfactory.tasks.synthesis import SynthesisInfer


class DatasetGAN(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        get = lambda key, cast, default: cast(conf.get(f"interpreter_{key}") or default)  # noqa: E731
        self.defaults = TrainConfig(members=get("members", int, 10), max_epochs=get("max_epochs", int, 30),
                                    pixels_per_image=get("pixels_per_image", int, 1024), lr=get("lr", float, 1e-3))
        self.candidates = int(conf.get("candidates") or 8)
        self.truncation_psi = float(conf.get("truncation_psi") or 0.7)
        self.models = InterpreterModels(model_dir)

    def infer(self):
        return {"datasetgan": DatasetGANInfer(self.models), "synthesis": SynthesisInfer(self.models, self.truncation_psi)}

    def trainer(self):
        return {"interpreter": InterpreterTrain(self.model_dir, self.defaults)}

    def strategy(self):
        return {"generated_uncertain": GeneratedUncertain(self.models, self.candidates, self.truncation_psi)}

    def scoring_method(self):
        return {"generated_uncertainty": GeneratedUncertainty(self.models)}
