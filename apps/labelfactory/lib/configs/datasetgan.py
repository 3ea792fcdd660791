"""DatasetGAN's interpreter: trainer `interpreter` (model file interpreter.pt) and infer `datasetgan`.

Conf: interpreter_members (10), interpreter_max_epochs (30), interpreter_pixels_per_image (1024),
interpreter_lr (0.001).
"""

from monailabel.interfaces.config import TaskConfig

from labelfactory.interpreter.train import TrainConfig
from labelfactory.tasks.interpreter import DatasetGANInfer, InterpreterModels, InterpreterTrain


class DatasetGAN(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        get = lambda key, cast, default: cast(conf.get(f"interpreter_{key}") or default)  # noqa: E731
        self.defaults = TrainConfig(members=get("members", int, 10), max_epochs=get("max_epochs", int, 30),
                                    pixels_per_image=get("pixels_per_image", int, 1024), lr=get("lr", float, 1e-3))
        self.models = InterpreterModels(model_dir)

    def infer(self):
        return {"datasetgan": DatasetGANInfer(self.models)}

    def trainer(self):
        return {"interpreter": InterpreterTrain(self.model_dir, self.defaults)}
