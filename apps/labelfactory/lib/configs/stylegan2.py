"""StyleGAN2-ADA (the DatasetGAN image source): trainer `stylegan2`, model file stylegan2.pt.

Conf: stylegan2_preset (auto | paper256 | demo; auto = paper256 with a GPU, demo on CPU),
stylegan2_<field> for each of CONF_OPTIONS (defaults: the preset), stylegan2_fid_weights (path
to pytorch-fid's Inception weights).
"""

from monailabel.interfaces.config import TaskConfig

from labelfactory.options import config_overrides, exposed
from labelfactory.stylegan2.config import StyleGAN2Config, preset
from labelfactory.tasks.stylegan2 import StyleGAN2Train

CONF_OPTIONS = exposed(StyleGAN2Config, "conf")  # the trainer's options and resolution


class StyleGAN2(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        base = preset(conf.get("stylegan2_preset", "auto"))
        self.defaults = config_overrides(base, conf, CONF_OPTIONS, prefix="stylegan2_")
        self.fid_weights = conf.get("stylegan2_fid_weights") or None
        self.device = kwargs.get("device", "auto")  # the app's (main.py)

    def infer(self):
        return {}

    def trainer(self):
        return {"stylegan2": StyleGAN2Train(self.model_dir, self.defaults, self.fid_weights, self.device)}
