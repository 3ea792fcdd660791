"""DatasetGAN: trainer `datasetgan` (model file datasetgan.pt; `interpreter`, its old name, still trains
it), infers `datasetgan` (mask of a generated image) and `synthesis` (a new image + mask from a seed),
next-sample strategy `generated_uncertain` and scoring `generated_uncertainty`.

Conf: datasetgan_<option> (or the older interpreter_<option>) for each trainer option
(`DatasetGANTrain.options`; defaults: `labelfactory.datasetgan.train.DatasetGANConfig`), candidates
(K new images scored per next sample), explore (every N-th next sample a random new image; 0 never;
default 2), rule (how the other next samples are chosen: `uncertainty`, the default, or `coverage`, the rarest
predicted organs; `labelfactory.tasks.active_learning.pick`) and truncation_psi (defaults: `GeneratedUncertain`'s,
`SynthesisInfer`'s).
"""

from monailabel.interfaces.config import TaskConfig

from labelfactory.datasetgan.train import DatasetGANConfig
from labelfactory.labels import DEFAULT
from labelfactory.options import config_overrides
from labelfactory.tasks.active_learning import GeneratedUncertain, GeneratedUncertainty
from labelfactory.tasks.datasetgan import DatasetGANInfer, DatasetGANModels, DatasetGANTrain
from labelfactory.tasks.synthesis import SynthesisInfer


class DatasetGAN(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        legacy = config_overrides(DatasetGANConfig(), conf, DatasetGANTrain.options, prefix="interpreter_")
        self.defaults = config_overrides(legacy, conf, DatasetGANTrain.options, prefix="datasetgan_")
        self.candidates = {"candidates": int(conf["candidates"])} if conf.get("candidates") else {}
        self.psi = {"truncation_psi": float(conf["truncation_psi"])} if conf.get("truncation_psi") else {}
        self.explore = {"explore": int(conf["explore"])} if conf.get("explore") else {}
        self.rule = {"rule": conf["rule"]} if conf.get("rule") else {}
        self.label_names = kwargs.get("label_map", DEFAULT).values  # the app's served map (main.py)
        self.device = kwargs.get("device", "auto")  # the app's (main.py): every task below runs there
        self.models = DatasetGANModels(model_dir, self.label_names, self.device)

    def infer(self):
        return {
            "datasetgan": DatasetGANInfer(self.models, self.label_names),
            "synthesis": SynthesisInfer(self.models, label_names=self.label_names, **self.psi),
        }

    def trainer(self):
        return {
            "datasetgan": DatasetGANTrain(self.model_dir, self.defaults, self.label_names, device=self.device),
            "interpreter": DatasetGANTrain(
                self.model_dir, self.defaults, self.label_names, deprecated_as="interpreter", device=self.device
            ),
        }

    def strategy(self):
        return {
            "generated_uncertain": GeneratedUncertain(
                self.models, **self.candidates, **self.psi, **self.explore, **self.rule
            )
        }

    def scoring_method(self):
        return {"generated_uncertainty": GeneratedUncertainty(self.models)}
