"""Downstream segmenter (UNet++ by default): trainer and infer `segmentation`.

Conf: segmentation_synthetic (synthetic data set folder; default <app_dir>/synthetic, used when it
exists), segmentation_network, segmentation_steps, segmentation_size.
"""

import os

from monailabel.interfaces.config import TaskConfig

from labelfactory.segmentation.train import TrainConfig
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain


class Segmentation(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.synthetic_dir = conf.get("segmentation_synthetic") or os.path.join(os.path.dirname(model_dir), "synthetic")
        self.defaults = TrainConfig(network=conf.get("segmentation_network", "unetpp"), steps=int(conf.get("segmentation_steps", 2000)),
                                    size=int(conf.get("segmentation_size", 256)))

    def infer(self):
        return {"segmentation": SegmentationInfer(self.model_dir)}

    def trainer(self):
        return {"segmentation": SegmentationTrain(self.model_dir, self.defaults, self.synthetic_dir)}
