"""Downstream segmenter (UNet++ by default): trainer and infer `segmentation`.

Conf: segmentation_synthetic (synthetic data set folder; default <app_dir>/synthetic, used when it
exists) and segmentation_<option> for each trainer option (`SegmentationTrain.options`; defaults: the
recipe the served segmentation.pt records, else `labelfactory.segmentation.train.SegmentationConfig`).
"""

import os

from monailabel.interfaces.config import TaskConfig

from labelfactory.labels import DEFAULT
from labelfactory.options import config_overrides
from labelfactory.segmentation.train import MODEL_FILE, SegmentationConfig, recorded_config
from labelfactory.tasks.base import served_recipe
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain


class Segmentation(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.synthetic_dir = conf.get("segmentation_synthetic") or os.path.join(os.path.dirname(model_dir), "synthetic")
        self.label_names = kwargs.get("label_map", DEFAULT).values  # the app's served map (main.py)
        # the served model's recipe, so that Train retrains it as it was made (else the library's defaults)
        served = served_recipe(recorded_config, os.path.join(model_dir, MODEL_FILE), None)
        base = (
            served
            if served and served.label_names == self.label_names
            else SegmentationConfig(label_names=self.label_names)
        )
        self.defaults = config_overrides(base, conf, SegmentationTrain.options, prefix="segmentation_")
        self.device = kwargs.get("device", "auto")  # the app's (main.py)

    def infer(self):
        return {"segmentation": SegmentationInfer(self.model_dir, self.label_names, self.device)}

    def trainer(self):
        return {"segmentation": SegmentationTrain(self.model_dir, self.defaults, self.synthetic_dir, self.device)}
