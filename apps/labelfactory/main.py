"""labelfactory as a MONAI Label app: wires the configs in lib/configs to infers, trainers,
strategies and scoring. No model code lives here (see the `labelfactory` library).

Conf options (`--conf KEY VALUE`): models (comma list or 'all', default all),
skip_trainers, skip_strategies, skip_scoring, model_dir (the models folder the app reads and
trainers publish to; default <app_dir>/model), labels (a label map of `labelfactory.labels`;
default: the map the models in model_dir record, see `served_map`), labels_fallback (the map
served, with a warning, when no model records one: the data set's own, which `labelfactory serve`
passes for a bundled sample; default totalsegmentator), device (where every task trains and infers:
auto | cpu | cuda | cuda:N, `labelfactory.devices`; default auto, the GPU when one is present; each
task's /info entry shows it), plus each config's own
(see lib/configs). Infers refuse (409) a model trained under another label map than the served one.
"""

import logging
import os
import threading

import lib.configs
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.async_tasks.utils import tasks as background_tasks
from monailabel.utils.others.class_utils import get_class_names
from monailabel.utils.others.generic import strtobool

from labelfactory import __version__
from labelfactory.checkpoints import remove_leftover_temp_files
from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.labels import served_map
from labelfactory.latent_record import LATENT_KEY
from labelfactory.options import cast
from labelfactory.tasks.base import InferBase
from labelfactory.tasks.datastore import LabelFactoryDatastore, check_id
from labelfactory.tasks.uploads import is_live_upload

logger = logging.getLogger(__name__)


class LabelFactoryApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")  # labelfactory serve --models
        self.label_map, why = served_map(conf.get("labels"), self.model_dir, conf.get("labels_fallback"))
        logger.info(f"labelfactory models in {self.model_dir}, label map {self.label_map.describe()}: {why}")
        self.device = str(resolve_device(conf.get("device", "auto")))  # a bad one stops the start, naming it
        logger.info(f"labelfactory tasks train and infer on {self.device}")
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
            self.models[name].init(name, self.model_dir, conf, None, label_map=self.label_map, device=self.device)
        logger.info(f"labelfactory models: {list(self.models)}")
        self._scoring_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="labelfactory",
            description="A labelling factory for CT: DatasetGAN synthesis and segmentation, ClamNet weak segmentation, "
            "UNet++",
            version=__version__,
            labels=self.label_map.values,
        )

    def info(self):
        meta = super().info()
        meta["label_colors"] = {name: [c / 255 for c in rgb] for name, rgb in self.label_map.colors.items()}
        meta["label_map"] = self.label_map.name
        return meta

    def on_init_complete(self):
        """Server start (never in a training or scoring subprocess): temp files of interrupted writes are removed."""
        remove_leftover_temp_files(self.model_dir)
        if isinstance(self._datastore, LabelFactoryDatastore):
            self._datastore.remove_leftover_temp_files()
        super().on_init_complete()

    def async_scoring(self, method, params=None):
        """Coalesced: a method with a run waiting to start gets no second one (that run will see the new images)."""
        with self._scoring_lock:
            waiting = {
                t["request"].get("method") for t in background_tasks("scoring") if t.get("status") == "SUBMITTED"
            }
            methods = [m for m in ([method] if method else self._scoring_methods) if m not in waiting]
            if len(methods) < (1 if method else len(self._scoring_methods)):
                logger.info(f"scoring already waiting for {sorted(waiting)}: not queued again")
            result = {}
            for m in methods:
                result[m] = super().async_scoring(m, params)
        return result.get(method, {}) if method else result

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LabelFactoryDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            label_names=self.label_map.values,
        )

    def infer(self, request, datastore=None):
        """Only datastore ids, the server's own live uploads and session images reach a task, never other paths.

        The app is the infers' one door to the datastore: each infer's `prepare` adds what it needs from it
        (e.g. a generated image's latent record) and its `finish` stores what it made (e.g. a generated
        image); an infer that makes its image (`makes_its_image`) names it freely. `save_label` (datastore ids
        only) writes the model's label into `label_tag` (default `original`) only where no annotator's label
        is (409 otherwise, checked before the infer runs and again at the write).
        """
        if LATENT_KEY in request:  # provenance comes from the datastore only, for every model
            raise LabelFactoryError(f"'{LATENT_KEY}' is set by the server from the datastore, never by a request")
        image = request.get("image")
        model = request.get("model")
        task = self._infers.get(model)
        if not isinstance(task, InferBase):
            return super().infer(request, datastore)  # MONAI Label answers an unknown model
        ds = datastore or self.datastore()
        save, tag, image_id = None, request.get("label_tag") or DefaultLabelTag.ORIGINAL.value, None
        if not task.makes_its_image and not (self._is_session_image(request) or is_live_upload(image)):
            if not isinstance(image, str):
                raise LabelFactoryError("image must be a datastore id (or an upload: file=..., or session_id=...)")
            check_id(image)  # never a path, whatever the datastore
            image_id = image
            if isinstance(ds, LabelFactoryDatastore):
                ds.require_image(image)
                if cast(bool, "save_label", request.get("save_label", False)):
                    check_id(tag, "label tag")
                    ds.check_model_may_write(image, tag, model)  # fail before the model runs; checked again
                    save = tag
            request = {**request, "save_label": False}  # saved here, by_model, not by MONAI Label
        request = task.prepare(request, ds, image_id)
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        task.finish(params, ds)
        if save is not None and result.get("file"):
            info = {"model": model, "params": params}
            result["label"] = ds.save_label(image, result["file"], save, info, by_model=model)
            result["tag"] = save
        return result

    def _is_session_image(self, request):
        """Whether the request's image is the image of the session it names (what MONAI Label resolves a
        session_id to): the session is looked up by its id, never trusted from the request."""
        sessions, session = self.sessions(), request.get("session")
        if sessions is None or not isinstance(session, dict) or not isinstance(session.get("name"), str):
            return False
        name = session["name"]
        if not name or name != os.path.basename(name) or name in (".", ".."):
            return False
        info = sessions.get_session(name, update_ts=False)
        image = request.get("image")
        return (
            info is not None
            and isinstance(image, str)
            and image == info.image
            and os.path.realpath(image).startswith(os.path.realpath(sessions.store_path) + os.sep)
        )

    def init_infers(self):
        return {k: v for c in self.models.values() for k, v in _as_dict(c.infer(), c.name).items()}

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {k: v for c in self.models.values() for k, v in _as_dict(c.trainer(), c.name).items()}

    def init_strategies(self):
        if strtobool(self.conf.get("skip_strategies", "false")):
            return {}
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        out = {"random": Random(), "first": First()}  # MONAI Label's standard strategies, as its sample apps offer
        for c in self.models.values():
            out.update(_as_dict(c.strategy(), c.name))
        return out

    def init_scoring_methods(self):
        if strtobool(self.conf.get("skip_scoring", "false")):
            return {}
        return {k: v for c in self.models.values() for k, v in _as_dict(c.scoring_method(), c.name).items()}


def _as_dict(task, name):
    if not task:
        return {}
    return task if isinstance(task, dict) else {name: task}


def _load_class(path):
    module, cls = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[cls]), cls)
