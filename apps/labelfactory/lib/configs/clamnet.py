"""ClamNet (weak marker segmentation from image-level labels): trainer and infer `clamnet`.

Conf: clamnet_labels_csv (default: image_labels.csv beside or inside the studies folder),
clamnet_organ_dirs (comma list; default: a `reference` folder beside or inside the studies), and
clamnet_<option> for each trainer option (`ClamNetTrain.options`; defaults: the recipe of the models folder's
clamnet.pt when there is one, else `ClamNetConfig`).
"""

import os

from monailabel.interfaces.config import TaskConfig

from labelfactory.clamnet.train import MODEL_FILE, ClamNetConfig, recorded_config
from labelfactory.options import config_overrides
from labelfactory.tasks.base import served_recipe
from labelfactory.tasks.clamnet import ClamNetInfer, ClamNetTrain


class ClamNet(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels_csv = conf.get("clamnet_labels_csv") or None
        dirs = conf.get("clamnet_organ_dirs", "")
        self.organ_dirs = [d.strip() for d in dirs.split(",") if d.strip()] or None
        # the served model's recipe, so that Train retrains it as it was made (else the library's defaults)
        base = served_recipe(recorded_config, os.path.join(model_dir, MODEL_FILE), ClamNetConfig())
        self.defaults = config_overrides(base, conf, ClamNetTrain.options, prefix="clamnet_")
        self.device = kwargs.get("device", "auto")  # the app's (main.py)

    def infer(self):
        return {"clamnet": ClamNetInfer(self.model_dir, self.organ_dirs, self.device)}

    def trainer(self):
        return {"clamnet": ClamNetTrain(self.model_dir, self.defaults, self.labels_csv, self.organ_dirs, self.device)}
