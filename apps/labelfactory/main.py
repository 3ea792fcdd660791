"""labelfactory as a MONAI Label app: wires the configs in lib/configs to infers, trainers,
strategies and scoring. No model code lives here (see the `labelfactory` library).

Conf options (`--conf KEY VALUE`): models (comma list or 'all', default all),
skip_trainers, skip_strategies, skip_scoring, plus each config's own (see lib/configs).
"""

import logging
import os
import tempfile

import lib.configs
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.utils.others.class_utils import get_class_names
from monailabel.utils.others.generic import strtobool

from labelfactory import __version__
from labelfactory.interpreter.records import LATENT_KEY
from labelfactory.labels import LABEL_COLORS, LABEL_NAMES
from labelfactory.tasks.datastore import LabelFactoryDatastore
from labelfactory.tasks.synthesis import SynthesisInfer, seed_of

logger = logging.getLogger(__name__)


class LabelFactoryApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        available = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        unknown = [m for m in wanted if m != "all" and m not in available]
        if unknown:
            raise ValueError(f"unknown models {unknown}; available: all, {', '.join(sorted(available))}")
        names = sorted(available) if "all" in wanted else wanted
        self.models: dict[str, TaskConfig] = {}
        for name in names:
            cls = _load_class(available[name])
            self.models[name] = cls()
            self.models[name].init(name, self.model_dir, conf, None)
        logger.info(f"labelfactory models: {list(self.models)}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="labelfactory",
            description="A labelling factory for CT: DatasetGAN synthesis and segmentation, ClamNet weak segmentation, UNet++",
            version=__version__,
            labels=LABEL_NAMES,
        )

    def info(self):
        meta = super().info()
        meta["label_colors"] = {name: [c / 255 for c in rgb] for name, rgb in LABEL_COLORS.items()}
        return meta

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LabelFactoryDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def infer(self, request, datastore=None):
        """Only datastore ids or the server's own upload temp files reach a task, never other paths.

        `synthesis` takes image=seed<N> instead of an image id (it makes the image); a generated
        image's latent record (seed, psi, w) is added to the request for `datasetgan`.
        """
        image = request.get("image")
        ds = datastore or self.datastore()
        if request.get("model") == "synthesis":
            request = {**request, "seed": seed_of(image)}
        elif isinstance(image, str) and not _is_upload(image) and isinstance(ds, LabelFactoryDatastore):
            ds.require_image(image)
            record = (ds.get_image_info(image) or {}).get(LATENT_KEY)
            if record:  # a generated image: its latent travels with the request (tasks see only the path)
                request = {**request, LATENT_KEY: record}
        return super().infer(request, datastore)

    def init_infers(self):
        infers = {k: v for c in self.models.values() for k, v in _as_dict(c.infer(), c.name).items()}
        for task in infers.values():
            if isinstance(task, SynthesisInfer):
                task.datastore = self._datastore  # where add_to_datastore puts generated images
        return infers

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {k: v for c in self.models.values() for k, v in _as_dict(c.trainer(), c.name).items()}

    def init_strategies(self):
        if strtobool(self.conf.get("skip_strategies", "false")):
            return {}
        from monailabel.tasks.activelearning.random import Random

        out = {"random": Random()}
        for c in self.models.values():
            out.update(_as_dict(c.strategy(), c.name))
        return out

    def init_scoring_methods(self):
        if strtobool(self.conf.get("skip_scoring", "false")):
            return {}
        return {k: v for c in self.models.values() for k, v in _as_dict(c.scoring_method(), c.name).items()}


def _is_upload(path):
    """MONAI Label writes uploaded files to the system temp folder before calling infer."""
    return os.path.isabs(path) and os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir()) and os.path.isfile(path)


def _as_dict(task, name):
    if not task:
        return {}
    return task if isinstance(task, dict) else {name: task}


def _load_class(path):
    module, cls = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[cls]), cls)
