"""Typed params, loaded from ``params/<preset>.yaml``.

Every section is a pydantic model with ``extra="forbid"``: an unknown key or a value of
the wrong type fails with the file, the dotted key and what is allowed. Method params are
validated by each method's own model (see ``tskd.distill.registry``), so adding a method
never touches this file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from tskd.data.families import TASK_OF
from tskd.errors import ParamsError
from tskd.spec.params_yaml import read_params_yaml, validate_strict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticCfg(Strict):
    """Tiny CIFAR-100 generated in the real on-disk format (no download needed)."""

    seed: int = 0
    train_per_class: int = Field(20, ge=1)
    test_per_class: int = Field(10, ge=1)
    nuisance_scale: float = Field(1.0, ge=0, description="scales every per-sample nuisance (shift, clutter, "
                                  "noise...): < 1 is easier, for runs of a few epochs")


class ImageNetSyntheticCfg(Strict):
    """Tiny ImageNet generated in the real prepared layout (wnid folders of JPEG files, meta.bin)."""

    seed: int = 0
    classes: int = Field(10, ge=2, le=1000, description="how many of ImageNet's classes (wnids)")
    train_per_class: int = Field(8, ge=1)
    val_per_class: int = Field(4, ge=1)
    image_size: int = Field(64, ge=8, description="side of the square JPEG images, px")


class CocoSyntheticCfg(Strict):
    """Tiny COCO generated in the real layout (train2017/, val2017/ JPEG files, annotations/instances_*.json):
    filled shapes, one kind and colour per category, on textured noise; with crowd, degenerate and tiny
    boxes and images without objects, as the real set has."""

    seed: int = 0
    train_images: int = Field(48, ge=8, description="images in train2017/ (a few have no object, a few only "
                              "crowd or degenerate boxes: those are not trained on)")
    val_images: int = Field(16, ge=8, description="images in val2017/ (all evaluated)")
    min_image_size: int = Field(96, ge=48, description="smallest width or height of an image, px (each side "
                                "is drawn in [min_image_size, max_image_size])")
    max_image_size: int = Field(160, ge=48, description="largest width or height of an image, px")
    categories: int = Field(5, ge=1, le=8, description="how many categories, taken in order from COCO ids 1, 3, "
                            "7, 18, 44, 62, 85, 90 (not contiguous, as COCO's are)")

    @model_validator(mode="after")
    def _size_range(self):
        if self.min_image_size > self.max_image_size:
            raise ValueError(f"min_image_size {self.min_image_size} is larger than max_image_size "
                             f"{self.max_image_size}")
        return self


class _DatasetBase(Strict):
    holds: ClassVar[str] = ""  # what `root` must hold, for messages
    root: str | None = Field(None, description="the dataset's directory (see the family); synthetic data is "
                             "written under results/<preset>/data")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out of train for model selection")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (persistent over the run); "
                             "results do not depend on it: each image's augmentation is drawn from (epoch, image)")

    @model_validator(mode="after")
    def _root_or_synthetic(self):
        if self.root is None and self.synthetic is None:
            raise ValueError(f"dataset.root is required unless dataset.synthetic is set: give the directory "
                             f"that holds {self.holds}")
        return self


class Cifar100Data(_DatasetBase):
    """CIFAR-100 (or your own data in its layout, see `tskd data register`)."""

    holds: ClassVar[str] = "cifar-100-python/"
    name: Literal["cifar100"] = "cifar100"
    download: bool = Field(False, description="download the official archive if missing (needs internet)")
    synthetic: SyntheticCfg | None = Field(None, description="generate a synthetic dataset instead of "
                                           "reading the real one")
    loader: Literal["dataloader", "device"] = Field(
        "dataloader", description="how training batches are made: 'dataloader' = a torch DataLoader over PIL "
        "images with torchvision's RandomCrop(32, padding=4) and RandomHorizontalFlip (the reference code's "
        "behaviour; num_workers applies); 'device' = the whole uint8 training set held on the run's device, "
        "crop, flip and normalisation as batched tensor ops there (no workers; keeps a GPU busy; also runs on "
        "CPU). Same image order and augmentation distribution, other random draws: part of the run's identity")


class ImageNetData(_DatasetBase):
    """ILSVRC2012 in torchvision's layout: the official archives, prepared once into train/, val/, meta.bin."""

    holds: ClassVar[str] = "the ILSVRC2012 archives (or their prepared train/, val/ and meta.bin)"
    name: Literal["imagenet"]
    synthetic: ImageNetSyntheticCfg | None = Field(None, description="generate a tiny ImageNet instead of "
                                                   "reading the real one")
    crop: int = Field(224, ge=8, description="training RandomResizedCrop and evaluation CenterCrop size, px")
    resize: int = Field(256, ge=8, description="evaluation Resize of the shorter side, px, before the crop")

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop > self.resize:
            raise ValueError(f"dataset.crop {self.crop} is larger than dataset.resize {self.resize}")
        return self


class CocoData(_DatasetBase):
    """COCO 2017 detection in its official layout: train2017/, val2017/ and annotations/instances_*2017.json,
    or the three official zips, extracted once by the data stage. Labels are COCO's category ids."""

    holds: ClassVar[str] = ("the COCO 2017 zips (train2017.zip, val2017.zip, annotations_trainval2017.zip) or "
                            "their extracted train2017/, val2017/ and annotations/")
    name: Literal["coco"]
    synthetic: CocoSyntheticCfg | None = Field(None, description="generate a tiny COCO instead of reading the "
                                               "real one")
    # The sizes torchvision's GeneralizedRCNNTransform resizes to (inside the model, not in the reader):
    # a run's input, so part of its identity; smaller values make a smoke run cheap.
    min_size: int = Field(800, ge=8, description="shorter image side the detector resizes to, px "
                          "(torchvision's GeneralizedRCNNTransform min_size)")
    max_size: int = Field(1333, ge=8, description="cap on the longer side after that resize, px "
                          "(GeneralizedRCNNTransform max_size)")

    @model_validator(mode="after")
    def _coco_sizes(self):
        if self.min_size > self.max_size:
            raise ValueError(f"dataset.min_size {self.min_size} is larger than dataset.max_size {self.max_size}")
        # Models are selected on val2017, as torchvision's and detectron2's recipes do; holding images out
        # of train2017 is not implemented, and silently ignoring the key would mislabel the runs.
        if self.val_fraction > 0:
            raise ValueError(f"dataset.val_fraction {self.val_fraction}: not supported for coco (no validation "
                             "split is held out of train2017; models are evaluated on val2017); set it to 0")
        return self


def _family(raw: Any) -> str:
    # A dataset without `name` is CIFAR-100, as before there were several families.
    return raw.get("name", "cifar100") if isinstance(raw, dict) else getattr(raw, "name", "cifar100")


# The dataset families, told apart by `name`: each has its own keys, so a CIFAR key in an ImageNet
# preset is refused with the file and the key. A new family adds its model here and a module in
# tskd/data/ that registers it (tskd.data.families).
DatasetCfg = Annotated[Annotated[Cifar100Data, Tag("cifar100")] | Annotated[ImageNetData, Tag("imagenet")]
                       | Annotated[CocoData, Tag("coco")], Discriminator(_family)]
DATASET_MODELS: dict[str, type[_DatasetBase]] = {"cifar100": Cifar100Data, "imagenet": ImageNetData,
                                                 "coco": CocoData}
SYNTHETIC_MODELS: dict[str, type[Strict]] = {"cifar100": SyntheticCfg, "imagenet": ImageNetSyntheticCfg,
                                             "coco": CocoSyntheticCfg}


class RecipeCfg(Strict):
    """An optimisation recipe (docs/method.md, "Recipes")."""

    # Keys that only a detector reads: refused in a classification preset rather than ignored.
    DETECTION_ONLY: ClassVar[tuple[str, ...]] = ("rpn_post_nms_top_n_train", "trainable_backbone_layers")

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_small: float | None = Field(None, gt=0, description="lr for ShuffleNet/MobileNet students")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    weight_decay_norm: float | None = Field(
        None, ge=0, description="weight decay of the weights and biases of normalisation layers (BatchNorm, "
        "GroupNorm, LayerNorm, InstanceNorm; the method's own modules included, e.g. ReviewKD's ABF BatchNorm); "
        "null = weight_decay, as every parameter (torchvision's references). detectron2 (mdistiller's detection): "
        "0, WEIGHT_DECAY_NORM")
    milestones: list[int] = Field(default_factory=list, description="epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    milestone_mode: Literal["at", "after"] = Field(
        "at", description="'at': epoch m (0-based) is the first to train with the decayed lr (mdistiller, "
        "CRD); 'after': the lr decays once epoch m has finished, so epoch m+1 is the first (the ReviewKD and "
        "TSKD authors' code calls its lr_schedule at the end of each epoch)")
    normalization: Literal["cifar100", "cifar10", "imagenet"] = Field(
        "cifar100", description="mean/std: cifar100 (CRD/mdistiller), cifar10 (ReviewKD/TSKD authors on CIFAR) or "
        "imagenet (torchvision)")
    augment: tuple[Literal["crop", "flip"], ...] = Field(
        ("crop", "flip"), description="training augmentation, in this order: 'crop' = random crop (CIFAR: 32 px "
        "from the image padded by 4), 'flip' = horizontal flip (wrong for digits or text); [] = none")
    teacher_input: Literal["student", "renormalize"] = Field(
        "student", description="what a distillation run feeds its teacher: 'student' = the student's input "
        "tensor as it is (the TSKD authors, mdistiller), also when the teacher was trained with other "
        "normalisation statistics (logged and recorded in MLflow); 'renormalize' = the same images "
        "normalised with the teacher's own training statistics (read from its model.pt)")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this "
                                         "before each step; null = no clipping (every reference recipe here)")
    warmup_iters: int = Field(0, ge=0, description="linear learning-rate warm-up over the first this many steps "
                              "(torchvision's detection reference: 1000, capped at the first epoch's steps); 0 = none "
                              "(the classification recipes)")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="the warm-up's starting factor on the lr "
                                 "(torchvision's detection reference: 1/1000)")
    batchnorm: Literal["global", "per_rank"] = Field(
        "global", description="BatchNorm statistics of a data-parallel run (several tasks): 'global' = over "
        "the global batch (SyncBatchNorm), so N ranks train as one process would; 'per_rank' = each rank's "
        "own part, as the published multi-GPU ImageNet recipes (DataParallel / per-GPU BN). One process: "
        "no difference")
    aspect_grouping: Literal["none", "quantized", "orientation"] = Field(
        "none", description="draw each training batch from images of similar aspect ratio (detection): "
        "'quantized' = torchvision's reference (2k+2 groups, k = aspect_group_k), 'orientation' = detectron2's "
        "(mdistiller: wider than high or not), 'none' = batches from the shuffled order alone. Grouped epochs "
        "have len // batch_size full batches (tskd.data.aspect_groups)")
    aspect_group_k: int = Field(3, ge=0, description="torchvision's --aspect-ratio-group-factor (3) for "
                                "aspect_grouping 'quantized'")
    # Detection: where torchvision's reference recipe and mdistiller's detectron2 configs differ
    # (docs/method.md, "Detection"). The defaults are torchvision's, as the detectors were before.
    rpn_post_nms_top_n_train: int = Field(
        2000, ge=1, description="detection: proposals per image the RPN keeps after NMS in training, that the RoI "
        "head samples from (torchvision: 2000; detectron2/mdistiller POST_NMS_TOPK_TRAIN: 1000)")
    trainable_backbone_layers: dict[str, Annotated[int, Field(ge=0, le=6)]] = Field(
        default_factory=dict, description="detection: architecture -> how many backbone stages train when its "
        "backbone starts from an ImageNet file (`backbones`), counted as torchvision's trainable_backbone_layers "
        "(ResNets 0-5, MobileNetV2 0-6); an architecture not named gets torchvision's default, 3 (detectron2's "
        "FREEZE_AT 2 for the ResNets). mdistiller trains the whole MobileNetV2 (FREEZE_AT 0): "
        "{fasterrcnn_mobilenet_v2_fpn: 6}. A backbone trained from scratch trains every stage")
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method params of this recipe, over the preset's `methods` and "
        "under a pair's overrides (e.g. mdistiller's KD: {kd: {ce_weight: 0.1, kd_weight: 0.9}})")
    by_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="values of this recipe that differ for some methods, e.g. mdistiller's "
        "ImageNet recipe trains CRD and ReviewKD at {batch_size: 256, lr: 0.1}, the others at 512 and 0.2")

    def for_method(self, method: str) -> RecipeCfg:
        """The recipe a run of ``method`` trains with: ``by_method`` applied, method params left to the
        run's spec (they are folded into its method_params)."""
        values = self.model_dump() | self.by_method.get(method, {}) | {"methods": {}, "by_method": {}}
        return validate_strict(RecipeCfg, values)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        """The step-decayed learning rate of 0-based ``epoch``."""
        shift = 1 if self.milestone_mode == "after" else 0
        return base_lr * self.gamma ** sum(epoch >= m + shift for m in self.milestones)

    def warmup_at(self, iteration: int) -> float:
        """The factor on the learning rate at 0-based training ``iteration`` (step, counted over epochs):
        linear from ``warmup_factor`` to 1 over the first ``warmup_iters`` steps, then 1."""
        if iteration >= self.warmup_iters:
            return 1.0
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1 - alpha) + alpha

    @model_validator(mode="after")
    def _milestones_sorted(self):
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        for method, values in self.by_method.items():
            bad = sorted(set(values) - set(type(self).model_fields) | set(values) & {"methods", "by_method"})
            if bad:
                raise ValueError(f"by_method.{method}: {', '.join(bad)} cannot be set per method; allowed: the "
                                 "recipe's own keys (epochs, batch_size, lr, ...)")
            try:
                validate_strict(RecipeCfg, self.model_dump() | values | {"by_method": {}})
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"by_method.{method}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self


class TrainCfg(Strict):
    """Where and how the loop runs; decided once, in the trainer. ``RESULT_NEUTRAL`` fields leave the
    results unchanged; the rest is part of a run's identity."""

    RESULT_NEUTRAL: ClassVar[tuple[str, ...]] = ("eval_batch_size", "checkpoint_minutes", "check_finite_every")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast applies on CUDA only")
    compile: bool = Field(False, description="torch.compile the student's and the teacher's forwards (inductor; "
                          "state_dict keys unchanged). Pays on CUDA; benchmarks/gpu_check.py measures it")
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on CUDA (Ampere or newer) in fp32 parts; "
                       "on is the authors' torch 1.9 default; off: IEEE fp32 as on a CPU")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default)")
    deterministic: bool = True
    eval_batch_size: int = Field(256, ge=1)
    checkpoint_minutes: float | None = Field(
        20.0, gt=0, description="also checkpoint inside an epoch every this many minutes (data position, "
        "random state and the epoch's sums included), so that a job whose time limit is shorter than an "
        "epoch still progresses; null: at epoch ends only. Resuming gives the same numbers either way")
    check_finite_every: int = Field(
        20, ge=1, description="read the loss's finiteness every this many steps (agreed over ranks); on a GPU "
        "each read waits for the device. A NaN costs at most this many steps' compute: checkpoints are only "
        "written right after a passing check")


class TeacherCfg(Strict):
    recipe: str = Field(description="name of a recipe in `recipes`")
    seed: int = 0
    checkpoint: str | None = Field(None, description="published teacher file (CRD/mdistiller "
                                   "ckpt_epoch_240.pth) to import instead of training")


class PairCfg(Strict):
    teacher: str = Field(description="a key of `teachers`")
    student: str = Field(description="a registered architecture")
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-pair overrides of method params, e.g. {dkd: {beta: 2}} "
        "(published configs tune some values per pair)")

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.student}"


class TrackingCfg(Strict):
    experiment: str | None = Field(None, description="MLflow experiment (default: tskd-<preset>)")


# The key of a `methods` entry that makes it a variant: the registered method it runs.
VARIANT_KEY = "method"


class Preset(Strict):
    preset: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    results_dir: str = "results"
    dataset: DatasetCfg
    recipes: dict[str, RecipeCfg]
    teachers: dict[str, TeacherCfg]
    pairs: list[PairCfg]
    student_recipes: list[str] = Field(min_length=1, description="names of the recipes students train with; "
                                       "every student job runs once per recipe")
    methods: dict[str, dict[str, Any]] = Field(
        description="method name -> its params. A *variant* runs a registered method under a name of its own: "
        "`tskd_k2: {method: tskd, k: 2}` (the reserved key `method` names the registered method; the variant's "
        "params start from that method's defaults, not from another entry)")
    seeds: list[int] = Field(min_length=1)
    backbones: dict[str, str] = Field(
        default_factory=dict, description="detection architecture -> the ImageNet classifier file its backbone "
        "starts from (a path, or torchvision:<weights> of the backbone's torchvision model, e.g. "
        "torchvision:IMAGENET1K_V1, from torch's hub cache), as the published detection students do. A detector "
        "without one trains from scratch (plain BatchNorm, every layer trainable)")
    train: TrainCfg = TrainCfg()
    tracking: TrackingCfg = TrackingCfg()

    @model_validator(mode="after")
    def _references(self):
        if TASK_OF.get(self.dataset.name) != "detection":
            for name, recipe in self.recipes.items():
                # A value other than the default: a preset written out whole (the report's JSON
                # file, a dump of the parsed preset) carries the defaults too.
                changed = [k for k in recipe.DETECTION_ONLY if k in recipe.model_fields_set and getattr(recipe, k)
                           != type(recipe).model_fields[k].get_default(call_default_factory=True)]
                if changed:
                    key = changed[0]
                    raise ValueError(f"recipes.{name}.{key}: a detection setting; dataset {self.dataset.name} "
                                     "trains classifiers")
        for name, t in self.teachers.items():
            if t.recipe not in self.recipes:
                raise ValueError(f"teachers.{name}.recipe: unknown recipe {t.recipe!r}; "
                                 f"defined: {sorted(self.recipes)}")
        for name, values in self.methods.items():
            method = (values or {}).get(VARIANT_KEY, name)
            if not isinstance(method, str):
                raise ValueError(f"methods.{name}.{VARIANT_KEY}: must be the name of a registered method, got "
                                 f"{method!r}")
        for i, name in enumerate(self.student_recipes):
            if name not in self.recipes:
                raise ValueError(f"student_recipes.{i}: unknown recipe {name!r}; defined: {sorted(self.recipes)}")
        if len(set(self.student_recipes)) != len(self.student_recipes):
            raise ValueError(f"student_recipes: duplicates in {self.student_recipes}")
        for name in self.student_recipes:
            for key in ("methods", "by_method"):
                for m in getattr(self.recipes[name], key):
                    # by_method is read by the registered method's name (a variant trains with its recipe)
                    if m not in self.methods and not (key == "by_method" and m in self.registered_methods()):
                        raise ValueError(f"recipes.{name}.{key}.{m}: a method that is not in `methods` "
                                         f"({sorted(self.methods)})")
        for i, p in enumerate(self.pairs):
            if p.teacher not in self.teachers:
                raise ValueError(f"pairs.{i}.teacher: {p.teacher!r} is not a key of `teachers` "
                                 f"({sorted(self.teachers)})")
            for m in p.methods:
                if m not in self.methods:
                    raise ValueError(f"pairs.{i}.methods.{m}: overrides a method that is not in `methods` "
                                     f"({sorted(self.methods)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {self.seeds}")
        return self

    def registered(self, name: str) -> str:
        """The registered method that the entry ``name`` of ``methods`` runs: its ``method`` key for a
        variant, else the name itself."""
        return (self.methods[name] or {}).get(VARIANT_KEY, name)

    def registered_methods(self) -> set[str]:
        return {self.registered(name) for name in self.methods}

    def recipe_for(self, recipe: str, name: str) -> RecipeCfg:
        """The recipe a run of the entry ``name`` trains with: ``by_method`` of its registered method."""
        return self.recipes[recipe].for_method(self.registered(name))

    def method_params(self, method: str, pair: PairCfg, recipe: str) -> dict[str, Any]:
        """A method entry's params as written for one run: the preset's values (less a variant's
        ``method`` key), then the recipe's, then the pair's overrides, each by the entry's own name
        (defaults are filled in by the registered method's params model)."""
        own = {k: v for k, v in (self.methods[method] or {}).items() if k != VARIANT_KEY}
        return {**own, **self.recipes[recipe].methods.get(method, {}), **pair.methods.get(method, {})}

    @property
    def out(self) -> Path:
        return Path(self.results_dir) / self.preset


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for err in e.errors():
        # A family's tag in a dataset's location (dataset.imagenet.download) is not a key of the file.
        loc = [part for i, part in enumerate(err["loc"])
               if not (part in DATASET_MODELS and i and err["loc"][i - 1] == "dataset")]
        key = ".".join(map(str, loc)) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        # A top-level error's input is the whole file: not worth repeating.
        got = "" if err["type"] == "missing" or not err["loc"] else f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def parse_preset(raw: dict[str, Any], source: str = "<params>") -> Preset:
    """Validate a params mapping, strictly (``tskd.spec.params_yaml.validate_strict``: "64" is not an int, "yes"
    not a bool); methods and architectures are checked against the registries."""
    # Checked here, not in a "before" validator of the model: one would make pydantic validate the
    # whole file in Python mode, where strict mode refuses YAML's lists for tuple fields.
    if isinstance(raw, dict) and "student_recipe" in raw:
        raise ParamsError(f"{source}: invalid params\n  student_recipe: renamed `student_recipes`, a list of "
                          f"recipe names (e.g. student_recipes: [{raw['student_recipe']}])")
    try:
        preset = validate_strict(Preset, raw)
    except ValidationError as e:
        raise ParamsError(format_validation_error(e, source)) from None
    _check_registered(preset, source)
    return preset


def _check_registered(preset: Preset, source: str) -> None:
    # Imported here: registries import torch, which the schema generator does not need.
    from tskd.distill.registry import list_methods, method_class, parse_method_params  # lazy: torch
    from tskd.models.registry import list_models  # lazy: torch

    task = TASK_OF.get(preset.dataset.name, "classification")

    known_models = set(list_models())
    archs = [(f"teachers.{k}", k) for k in preset.teachers]
    archs += [(f"pairs.{i}.student", p.student) for i, p in enumerate(preset.pairs)]
    for key, arch in archs:
        if arch not in known_models:
            raise ParamsError(f"{source}: {key}: unknown architecture {arch!r}; "
                              f"registered: {', '.join(sorted(known_models))}")
    from tskd.models.registry import model_entry  # lazy: torch

    used = {arch for _, arch in archs}
    for arch in preset.backbones:
        if arch not in used or model_entry(arch).family != "detection":
            detectors = sorted(a for a in used if model_entry(a).family == "detection")
            raise ParamsError(f"{source}: backbones.{arch}: not a detection architecture of this preset's teachers "
                              f"or pairs ({', '.join(detectors) or 'it has none'})")
    # Any registered detector, used by this grid or not: a reduced grid (tskd.spec.scale_preset) keeps the recipe.
    detectors = sorted(a for a in known_models if model_entry(a).family == "detection")
    for name, recipe in preset.recipes.items():
        for arch in recipe.trainable_backbone_layers:
            if arch not in detectors:
                raise ParamsError(f"{source}: recipes.{name}.trainable_backbone_layers.{arch}: not a detection "
                                  f"architecture ({', '.join(detectors)})")
    _check_variants(preset, list_methods(task), task, source)
    for recipe in preset.student_recipes:
        for i, pair in enumerate(preset.pairs):
            seen: dict[str, str] = {}  # a run's content (registered method and params) -> the entry's name
            for name in preset.methods:
                method = preset.registered(name)
                where = (f"pairs.{i}.methods" if name in pair.methods else
                         f"recipes.{recipe}.methods" if name in preset.recipes[recipe].methods else "methods")
                try:
                    params = parse_method_params(method, preset.method_params(name, pair, recipe), where=where,
                                                 task=task)
                except ValueError as e:
                    # The registry names the registered method's key; the file's key is the entry's name.
                    raise ParamsError(f"{source}: " + str(e).replace(f"  {where}.{method}.", f"  {where}.{name}."))\
                        from None
                # The epochs the job trains: the recipe with by_method of the entry's registered method.
                epochs = preset.recipe_for(recipe, name).epochs
                try:
                    method_class(method, task).check_schedule(params, epochs=epochs)
                except ValueError as e:
                    raise ParamsError(_schedule_message(preset, source, recipe, name, where, epochs, str(e))) from None
                # Results are keyed by content, not by name: two entries that train the same run would
                # be the same result twice under two names.
                content = json.dumps([method, params.model_dump(mode="json")], sort_keys=True)
                if content in seen:
                    raise ParamsError(f"{source}: methods.{name}: the same run as methods.{seen[content]} (method "
                                      f"{method}, the same effective params on pair {pair.name}, recipe {recipe}); "
                                      "a variant must change at least one param")
                seen[content] = name
        _check_student_alone(preset, recipe, source)


def _schedule_message(preset: Preset, source: str, recipe: str, name: str, where: str, epochs: int,
                      problem: str) -> str:
    """A method's schedule refused for runs of ``epochs``: the entry, and the key those epochs come from."""
    method = preset.registered(name)
    entry = f"methods.{name}" + (f" (a variant of {method})" if name != method else "")
    if name != method:  # the method names its own keys; the file's are the entry's
        problem = problem.replace(f"methods.{method}.", f"methods.{name}.")
    if "epochs" in preset.recipes[recipe].by_method.get(method, {}):
        key = f"recipes.{recipe}.by_method.{method}.epochs"
        also = (f", not recipes.{recipe}.epochs={preset.recipes[recipe].epochs}"
                + (f": a variant trains with the by_method of its registered method {method}" if name != method
                   else ""))
    else:
        key, also = f"recipes.{recipe}.epochs", ""
    return (f"{source}: {entry}, recipe {recipe}: {problem}. Its runs train {key}={epochs} epochs{also}; "
            f"change that key or the params of {where}.{name}")


def _check_variants(preset: Preset, registered: list[str], task: str, source: str) -> None:
    for name in preset.methods:
        method = preset.registered(name)
        if method == name:
            if name not in registered:
                raise ParamsError(f"{source}: methods.{name}: unknown method for {task}; allowed: "
                                  f"{', '.join(registered)} (or a variant: {name}: {{{VARIANT_KEY}: <one of "
                                  "those>, ...})")
            continue
        if method not in registered:
            raise ParamsError(f"{source}: methods.{name}.{VARIANT_KEY}: unknown method {method!r} for {task}; "
                              f"allowed: {', '.join(registered)}")
        if name in registered:
            raise ParamsError(f"{source}: methods.{name}: a variant cannot take the name of the registered method "
                              f"{name!r}; name it e.g. {method}_{name}")
        if method == "vanilla":  # trained once per student architecture, under the name `vanilla`
            raise ParamsError(f"{source}: methods.{name}.{VARIANT_KEY}: vanilla (the student alone) has no "
                              "variants")


def _check_student_alone(preset: Preset, recipe: str, source: str) -> None:
    """``vanilla`` runs once per (recipe, student architecture), whichever pairs share that student:
    their overrides of it must agree, or one of them would be silently dropped."""
    if "vanilla" not in preset.methods:
        return
    seen: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, pair in enumerate(preset.pairs):
        params = preset.method_params("vanilla", pair, recipe)
        first = seen.setdefault(pair.student, (i, params))
        if first[1] != params:
            raise ParamsError(
                f"{source}: pairs.{first[0]} and pairs.{i} share the student {pair.student!r}, whose `vanilla` "
                f"run (the student alone) is trained once, but set different vanilla params ({first[1]} vs "
                f"{params}). Give both pairs the same pairs.<i>.methods.vanilla values, or put them under "
                "`methods.vanilla`")


def load_preset(path: str | Path) -> Preset:
    """Read and validate ``params/<preset>.yaml``."""
    return parse_preset(read_params_yaml(path), source=str(path))


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys): the form in which specs are passed, hashed and compared."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]
