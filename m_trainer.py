"""Train, check, evaluate or apply a speaker-embedding enhancement network.

    python ./m_trainer.py --config configs/MyLinearNetv2_Exp6-4.yaml
    python ./m_trainer.py --config configs/X.yaml --check      # original vs enhanced EER
    python ./m_trainer.py --config configs/X.yaml --generate   # write enhanced embeddings

Options come from the defaults below, then the YAML config, then the options written on the
command line (which win).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from loss.m_Losses import LOSSES, loss_class
from m_DataLoader import EmbeddingData, Sampling, TrialSet, load_embeddings, read_list
from m_network import (
    CHECKPOINT_NAME,
    CHECKPOINT_PATTERN,
    OPTIMIZERS,
    SCHEDULERS,
    SpeakerNet,
    Trainer,
    checkpoints,
    parse_score_line,
    score_line,
)
from m_utils import (
    COMMAND_LINE,
    HARDWARE_OPTIONS,
    LOCK_NAME,
    DistContext,
    Option,
    Options,
    UserError,
    add_options,
    append_line,
    check_options,
    clear_leftovers,
    fault_point,
    hyper_parameters,
    launch,
    launched_by_torchrun,
    options_taken,
    read_user_text,
    resolve_device,
    run_lock,
    run_main,
    setup_logging,
    write_text_atomic,
)
from models.m_Models import ACTIVATIONS, MODELS, model_class
from scoring.backends import BACKEND_OPTIONS, Quality, check_backend_names, check_backend_options
from scoring.enrollment import ENROLL_OPTIONS, ModelTrials, enrolled_trials, models_of, trials_table
from scoring.evaluation import Results, Settings, TrainingSet, TrialList, evaluate, needs_training
from scoring.metrics import P_TARGETS, evaluate_scores, mindcf_key, score_trials
from scoring.report import (
    EER_DEFINITIONS,
    SYSTEMS,
    TRIAL_LISTS,
    check_result_tag,
    records_table,
    result_name,
    save_trial_scores,
    table_heading,
    write_records,
    write_score_file,
)
from stores.arrays import embedding_type_of
from stores.kinds import KINDS, generated_kind
from stores.write import kaldi_key, write_side_files

log = logging.getLogger("m_trainer")

OPTIONS: Options = {
    "config": Option(None, str, "YAML config file"),
    # Data loader
    "batch_size": Option(
        1000, int, "samples per step and process (DA losses: see da_speakers_per_step)", bounds=(1, None)
    ),
    "nDataLoaderThread": Option(
        5, int, "threads that read embedding files (0: the main thread)", bounds=(0, None)
    ),
    "seed": Option(10, int, "seed of every random choice"),
    "max_seg_per_spk": Option(
        500, int, "utterances per speaker and epoch with nPerSpeaker > 1", bounds=(1, None)
    ),
    "multiple_embedding_flag": Option(
        "B", str, "B: avg-norm-avg target, L2 scoring; C: avg-avg-norm, cosine"
    ),
    "triplet": Option(False, bool, "not used: kept so old configs load (the list type follows the loss)"),
    "nPerSpeaker": Option(1, int, "utterances of one speaker grouped in a batch", bounds=(1, None)),
    "da_speakers_per_step": Option(
        1, int, "speakers per step for the DA losses (the original repository used 1)", bounds=(1, None)
    ),
    # Training
    "test_interval": Option(5, int, "validate, test and save every this many epochs", bounds=(1, None)),
    "max_epoch": Option(100, int, "epochs to train", bounds=(1, None)),
    "trainfunc": Option("MSE", str, "loss name"),
    "optimizer": Option("adam", str, "the optimiser", choices=tuple(OPTIMIZERS)),
    "scheduler": Option("steplr", str, "learning-rate schedule, stepped once an epoch", choices=SCHEDULERS),
    "lr": Option(0.001, float, "learning rate"),
    "lr_decay": Option(0.95, float, "steplr: factor every test_interval epochs"),
    "weight_decay": Option(0.0, float, "weight decay"),
    "margin": Option(0.1, float, "not used: kept so old configs load (no loss has a margin)"),
    "scale": Option(30.0, float, "not used: kept so old configs load (no loss has a scale)"),
    "nClasses": Option(5994, int, "Softmax classes (at least the training speakers)", bounds=(1, None)),
    "sigma": Option(1.0, float, "RBF kernel width of the DA losses"),
    "softmax_init": Option(
        None, str, "extractor checkpoint whose __L__.softmax.fc.* start the Softmax layer"
    ),
    # Scoring (--check and --eval)
    "backends": Option(
        ("none", "asnorm"),
        list,
        "scoring back-ends of --check and --eval: none, mean, asnorm, "
        "plda, qmf, or chains of them such as mean+asnorm+qmf (none is always scored)",
    ),
    **BACKEND_OPTIONS,
    "eer": Option(
        "roc",
        str,
        "EER the tables and --check lines show: roc (voxceleb_trainer's, on sklearn's "
        "ROC points) or interpolated (WeSpeaker's); check.json records both",
        choices=EER_DEFINITIONS,
    ),
    "bootstrap": Option(
        1000, int, "resamples of the test speakers for the 95 %% intervals of the EER", bounds=(1, None)
    ),
    "calib_list": Option(None, str, "trial list over held-out embeddings to calibrate scores on"),
    "calib_path": Option(None, str, "embedding root of calib_list"),
    "result_tag": Option(
        None,
        str,
        "--check/--eval: results saved as check_<tag>.json, trials_<list>_<tag>.npz, "
        "... so that runs on other test sets (e.g. one per duration) keep each other's",
    ),
    # Paths
    "initial_model": Option(None, str, "start from (or, with --check/--eval/--generate, use) this model"),
    "save_path": Option(None, str, "experiment folder (default exp_emb/<config name>)"),
    "train_list": Option(None, str, "training list"),
    "valid_list": Option(None, str, "validation list (same type as the training list)"),
    "test_list": Option(None, str, "in-domain trial list"),
    "test_list_libri": Option(None, str, "out-of-domain (LibriSpeech) trial list"),
    "train_path": Option(None, str, "embedding root of train_list"),
    "valid_path": Option(None, str, "embedding root of valid_list"),
    "test_path": Option(None, str, "embedding root of test_list"),
    "test_path_libri": Option(None, str, "embedding root of test_list_libri"),
    # Model
    "model": Option("MyLinearNetv2", str, "enhancement model name"),
    "nOut": Option(512, int, "embedding dimension", bounds=(1, None)),
    "activation": Option("ReLU", str, "activation of the model's layers", choices=tuple(ACTIVATIONS)),
    # Modes
    "eval": Option(False, bool, "score the test lists with a trained model, no training"),
    "check": Option(False, bool, "original vs enhanced EER on both test lists"),
    "generate": Option(False, bool, "write the enhanced embedding of every gen_list entry"),
    "gen_list": Option(None, str, "normal list of the embeddings to enhance"),
    "gen_path": Option(None, str, "embedding root of gen_list"),
    "gen_target_dir": Option("enhanced", str, "folder under save_path for generated embeddings"),
    "gen_format": Option(
        None,
        str,
        "what --generate writes: tree (one .npy per entry), kaldi (<gen_target_dir>/"
        "xvector.scp + .ark) or packed (<gen_target_dir>.store); default: the kind of gen_path",
        choices=tuple(kind.name for kind in KINDS),
    ),
    "restart": Option(
        None,
        str,
        "training a save_path trained with other data or settings: resume (go on with these) "
        "or new (move its model/ and result/ to <save_path>/earlier/ and start anew)",
        choices=("resume", "new"),
    ),
    **HARDWARE_OPTIONS,
    "enroll_list": Option(
        None, str, "spk2utt-style list of the enrolment models test_list's left side names"
    ),
    "enroll_list_libri": Option(None, str, "spk2utt-style list of the enrolment models of test_list_libri"),
    "calib_enroll_list": Option(None, str, "spk2utt-style list of the enrolment models of calib_list"),
    "enroll_path": Option(None, str, "embedding root of enroll_list's utterances (default test_path)"),
    "enroll_path_libri": Option(
        None, str, "embedding root of enroll_list_libri's utterances (default test_path_libri)"
    ),
    "calib_enroll_path": Option(
        None, str, "embedding root of calib_enroll_list's utterances (default calib_path)"
    ),
}
# Options of the original repository that nothing here uses; setting one says so.
UNUSED_OPTIONS = ("triplet", "margin", "scale")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS if suppress_defaults else None
    )
    add_options(parser, OPTIONS, with_defaults=not suppress_defaults)
    return parser


def check_config_value(path: Path, key: str, value: Any) -> Any:
    """A config value converted to its option's type, or an error naming key and file."""
    if key not in OPTIONS:
        close = difflib.get_close_matches(key, OPTIONS, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{path}: unknown option '{key}'{hint}")
    default, kind = OPTIONS[key].default, OPTIONS[key].type
    if value is None:
        if default is None:
            return None
        raise UserError(f"{path}: option '{key}' needs a value of type {kind.__name__}")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list:
        value = value.split() if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        kind_name = "list of names" if kind is list else kind.__name__
        raise UserError(
            f"{path}: option '{key}' must be of type {kind_name}, found {type(value).__name__} {value!r}"
        )
    return kind(value)


def read_config(path: str) -> dict[str, Any]:
    config_path = Path(path)
    try:
        loaded = yaml.safe_load(read_user_text(config_path, "config file"))
    except yaml.YAMLError as err:
        raise UserError(f"{config_path}: not valid YAML ({err})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{config_path}: a config is a mapping of option: value")
    return {str(key): check_config_value(config_path, str(key), value) for key, value in loaded.items()}


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults, then the config, then options written on the command line; each value within its
    option's choices and bounds, an error naming the config file or the flag that set it."""
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    sources = dict.fromkeys(explicit, COMMAND_LINE)  # where each option given was set
    if args.config:
        config = read_config(args.config)
        lines = config_lines(args.config)
        for key, value in config.items():
            if key not in explicit and key != "config":
                setattr(args, key, value)
                sources[key] = f"{args.config}:{lines[key]}" if key in lines else args.config
        if args.save_path is None:
            args.save_path = str(Path("exp_emb") / Path(args.config).stem)
    if args.save_path is None:
        args.save_path = "exp_emb/default"
    check_options(args, OPTIONS, sources)
    check_names(args, {key: option_source(key, source) for key, source in sources.items()})
    check_hyper_parameters(args, sources)
    for key in sorted(sources.keys() & set(UNUSED_OPTIONS)):
        log.warning(
            "option '%s' is not used: it is accepted so that the original repository's configs load", key
        )
    return args


def config_lines(path: str | None) -> dict[str, int]:
    """The line of each option of a YAML config (for error messages); none without a config."""
    if not path:
        return {}
    try:
        node = yaml.compose(read_user_text(path, "config file"))
    except (UserError, yaml.YAMLError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def option_source(key: str, source: str) -> str:
    """Where an option was set, as the unknown-name errors say it: `--key` or `<config>:<line>: key`."""
    return f"--{key}" if source == COMMAND_LINE else f"{source}: {key}"


def check_names(args: argparse.Namespace, sources: dict[str, str]) -> None:
    """The model, loss and back-ends are known by their names; an unknown
    one is an error saying where it was given (`sources`: option -> `--model` or
    `<config>:<line>: model`)."""
    model_class(args.model, sources.get("model"))
    loss_class(args.trainfunc, sources.get("trainfunc"))
    check_backend_names(args.backends, sources.get("backends"))


def check_hyper_parameters(args: argparse.Namespace, sources: dict[str, str]) -> None:
    """Every hyper-parameter of the chosen model and loss is an option (else it would keep its
    default whatever the config says); a model's or loss' option that neither takes is said when
    set, naming where."""
    chosen = (model_class(args.model), loss_class(args.trainfunc))
    for cls in chosen:
        missing = [name for name in hyper_parameters(cls) if name not in OPTIONS]
        if missing:
            raise UserError(
                f"{cls.__name__} takes {', '.join(missing)}, which no option sets: add "
                "its row to m_trainer.OPTIONS"
            )
    taken = {name for cls in chosen for name in hyper_parameters(cls)}
    every = {name for cls in (*MODELS.values(), *LOSSES.values()) for name in hyper_parameters(cls)}
    for name in sorted((every - taken - {"nOut"}) & sources.keys()):
        log.warning(
            "%s: option '%s' is not used: model %s and loss %s do not take it",
            sources[name],
            name,
            args.model,
            args.trainfunc,
        )


# ----------------------------------------------------------------------------------------------
# Checks before any work


LIST_MAKER = "m_gen_list.py"
EMBED_MAKER = "m_gen_embs.py and m_comb_embs.py"
# Every list the trainer reads: its option and the option of its embedding root. The trial lists
# scored by --check and --eval are scoring.report.TRIAL_LISTS.
LISTS = {
    "train": ("train_list", "train_path"),
    "valid": ("valid_list", "valid_path"),
    "gen": ("gen_list", "gen_path"),
    "calib": ("calib_list", "calib_path"),
    **{trials.key: (trials.list_option, trials.path_option) for trials in TRIAL_LISTS},
}
FIRST_TRIALS, *OTHER_TRIALS = (trials.key for trials in TRIAL_LISTS)
# Lists each mode needs; `optional` ones are checked when set.
MODE_LISTS = {
    "train": {"required": (FIRST_TRIALS, "train"), "optional": (*OTHER_TRIALS, "valid")},
    "check": {"required": (FIRST_TRIALS,), "optional": (*OTHER_TRIALS, "calib")},
    "eval": {"required": (FIRST_TRIALS,), "optional": (*OTHER_TRIALS, "calib")},
    "generate": {"required": ("gen",), "optional": ()},
}
FLAGGED_MODES = ("check", "eval", "generate")  # modes asked for by their option; else train


def mode_of(args: argparse.Namespace) -> str:
    """The run's mode: check, eval or generate when asked for (in that order), else train."""
    return next((mode for mode in FLAGGED_MODES if getattr(args, mode)), "train")


def require_path(args: argparse.Namespace, key: str, maker: str) -> Path:
    value = getattr(args, key)
    if not value:
        raise UserError(f"option '{key}' is not set (in the config or as --{key})")
    path = Path(value)
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist ({maker} makes it)")
    return path


def check_paths(args: argparse.Namespace, mode: str) -> None:
    """The lists and embedding roots the mode needs exist; optional ones are checked when set."""
    needs = MODE_LISTS[mode]
    chosen = list(needs["required"]) + [name for name in needs["optional"] if getattr(args, LISTS[name][0])]
    if mode in ("check", "eval") and needs_training(args.backends) and args.train_list:
        chosen.append("train")  # the back-ends are fitted on the training embeddings
    for name in chosen:
        list_key, path_key = LISTS[name]
        require_path(args, list_key, LIST_MAKER)
        require_path(args, path_key, EMBED_MAKER)
        enroll_list, enroll_path = ENROLL_OPTIONS.get(name, ("", ""))
        if enroll_list and getattr(args, enroll_list):
            require_path(args, enroll_list, LIST_MAKER)
            if getattr(args, enroll_path):
                require_path(args, enroll_path, EMBED_MAKER)
    if args.initial_model:
        require_path(args, "initial_model", "m_trainer.py or the original repository")


def check_setup(args: argparse.Namespace, mode: str) -> None:
    """What parse_options cannot check alone (choices and bounds are checked there)."""
    embedding_type_of(args.multiple_embedding_flag)
    check_backend_options(args.backends, vars(args))
    check_result_tag(args.result_tag)
    resolve_device(args.device)
    check_paths(args, mode)
    save_path = Path(args.save_path)
    try:
        (save_path / "result").mkdir(parents=True, exist_ok=True)
        (save_path / "model").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_path / "result"):  # a unique name: runs may share it
            pass
    except OSError as err:
        raise UserError(f"save_path {save_path} is not writable ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------
# The shared setup of every mode


class Run:
    """One process's view of a run: options, device, folders, network and trainer; the lists
    it reads, each read once."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext):
        self.args = args
        self.ctx = ctx
        self.device = resolve_device(args.device, ctx.local_rank)
        self.save_path = Path(args.save_path)
        self.result_dir = self.save_path / "result"
        self.model_dir = self.save_path / "model"
        self.scorefile = self.result_dir / "scores.txt"
        self.loss_kind = loss_class(args.trainfunc).list_kind
        torch.manual_seed(args.seed)
        self.net = SpeakerNet(**vars(args))
        self.trainer = Trainer(self.net, self.device, ctx, **options_taken(Trainer, vars(args)))
        self.sampling = Sampling(
            batch_size=args.batch_size,
            seed=args.seed,
            n_per_speaker=args.nPerSpeaker,
            max_seg_per_spk=args.max_seg_per_spk,
            speakers_per_step=args.da_speakers_per_step,
        )
        self.trial_sets: dict[str, TrialSet | ModelTrials] = {}
        self.notes_said: set[str] = set()
        self.model_record: dict[str, Any] | None = None  # the model --check/--eval used

    def say(self, message: str, *params) -> None:
        if self.ctx.is_main:
            log.info(message, *params)

    def say_once(self, message: str) -> None:
        if message not in self.notes_said:
            self.notes_said.add(message)
            self.say("%s", message)

    def load_data(self, name: str, speakers=None) -> EmbeddingData:
        a = self.args
        list_key, path_key = LISTS[name]
        return EmbeddingData(
            getattr(a, list_key),
            getattr(a, path_key),
            self.loss_kind,
            a.multiple_embedding_flag,
            a.nOut,
            self.device,
            speakers,
            threads=a.nDataLoaderThread,
        )

    def trials(self, name: str) -> TrialSet | ModelTrials | None:
        """The trial list `name` (a TRIAL_LISTS key, or calib) with its embeddings, read once;
        None (said once for a TRIAL_LISTS one) when it is not set."""
        list_key, path_key = LISTS[name]
        if not getattr(self.args, list_key):
            titles = {trials.key: trials.title for trials in TRIAL_LISTS}
            if name in titles:
                self.say_once(f"{titles[name]} ({list_key}) not set: skipped")
            return None
        if name not in self.trial_sets:
            a = self.args
            list_path, root = getattr(a, list_key), getattr(a, path_key)
            enrolled = enrolled_trials(a, name, list_path, root)
            self.trial_sets[name] = (
                enrolled if enrolled is not None else TrialSet(list_path, root, a.nOut, a.nDataLoaderThread)
            )
        return self.trial_sets[name]

    def load_trained_model(self, required: bool = True) -> bool:
        """Load the model of --check/--eval/--generate: initial_model, else the newest checkpoint.
        Without one, a UserError when `required`, else False."""
        found = checkpoints(self.model_dir)
        path = Path(self.args.initial_model) if self.args.initial_model else found.get(max(found, default=0))
        if path is None:
            if required:
                raise UserError(
                    f"no trained model: {self.model_dir} holds no checkpoint and initial_model is not set"
                )
            return False
        self.trainer.load(path, weights_only=True)
        epoch, chosen = model_choice(self.args, found)
        self.say("model loaded from %s (%s)", path, chosen)
        self.model_record = model_record(self.args, path, self.trainer.loaded_original)
        self.model_record |= {"epoch": epoch, "chosen": chosen}
        if self.trainer.loaded_original and self.ctx.is_main:
            log.warning(
                "%s: a checkpoint of the original repository records neither its model nor its "
                "loss: assumed model %s (nOut %d, activation %s) and loss %s, which must match its "
                "training run (with type B the loss' output normalisation changes the enhanced "
                "scores)",
                path,
                self.args.model,
                self.args.nOut,
                self.args.activation,
                self.args.trainfunc,
            )
        return True

    def enhanced_metrics(self, name: str) -> dict[str, float] | None:
        """EER and minDCF of the enhanced embeddings on one trial list, at validation. Every rank
        takes part; the main rank alone gets the result."""
        trials = self.trials(name)
        if trials is None:
            return None
        cosine = embedding_type_of(self.args.multiple_embedding_flag).cosine
        enhanced = score_trials(trials_table(self.trainer.enhance, trials), trials.left, trials.right, cosine)
        return evaluate_scores(enhanced, trials.labels) if self.ctx.is_main else None


def model_choice(args: argparse.Namespace, found: dict[int, Path]) -> tuple[int | None, str]:
    """The epoch of the model --check/--eval/--generate uses and how it was chosen: the newest
    checkpoint (the last epoch trained), chosen without any trial list or validation score; or
    initial_model (epoch unknown)."""
    if args.initial_model:
        return None, "initial_model, as given"
    valid = f"; validation list {args.valid_list}" if args.valid_list else ""
    return max(found), (
        f"epoch {max(found)}, the newest checkpoint: the last epoch trained, chosen without "
        f"looking at any trial list{valid}"
    )


def model_record(args: argparse.Namespace, path: Path, original: bool) -> dict[str, Any]:
    """The model behind a --check/--eval result, for its records: with `assumed` true for a
    checkpoint of the original repository, whose model and loss are the options' assumption; with
    the run's seed and options (by which the viewer pools runs across seeds)."""
    return {
        "checkpoint": str(path),
        "format": "original repository" if original else "m_trainer",
        "assumed": original,
        **{key: getattr(args, key) for key in ("model", "trainfunc", "nOut", "activation", "seed")},
        "options": dict(sorted(vars(args).items())),
    }


# ----------------------------------------------------------------------------------------------
# Training


def train_mode(run: Run) -> None:
    """Train from the newest checkpoint (or initial_model) to max_epoch, validating, testing and
    saving every test_interval epochs."""
    a = run.args
    train_data = run.load_data("train")
    if run.net.loss.classifies and a.nClasses < len(train_data.speakers):
        raise UserError(
            f"nClasses {a.nClasses} is smaller than the {len(train_data.speakers)} "
            f"training speakers of {a.train_list}"
        )
    valid = run.load_data("valid", train_data.speakers) if a.valid_list else None
    for trials in TRIAL_LISTS:
        run.trials(trials.key)  # read before the first epoch: a bad list fails now
    if run.loss_kind == "distribution":
        run.say(
            "DA loss: %d speaker(s) per step and process (da_speakers_per_step); batch_size %d is not used",
            a.da_speakers_per_step,
            a.batch_size,
        )
    run.say(
        "training %s + %s on %d samples of %d speakers, %s, %d process(es)",
        a.model,
        a.trainfunc,
        len(train_data),
        train_data.num_speakers,
        run.device,
        run.ctx.world_size,
    )
    for epoch in range(resume(run) + 1, a.max_epoch + 1):
        began, lr = time.perf_counter(), run.trainer.lr
        loss = run.trainer.train_epoch(train_data, epoch, run.sampling)
        run.say("epoch %d: loss %.6f, lr %.6f, %.1f s", epoch, loss, lr, time.perf_counter() - began)
        if run.ctx.is_main:
            append_line(
                run.scorefile, score_line({"Epoch": epoch, "TLOSS": loss, "LR": lr}, validation=False)
            )
        if epoch % a.test_interval == 0 or epoch == a.max_epoch:
            validate_and_save(run, epoch, valid)


def resume(run: Run) -> int:
    """Restore the newest complete checkpoint (or initial_model); returns the last epoch done."""
    found = checkpoints(run.model_dir)
    if found:
        epoch = run.trainer.load(found[max(found)])
        run.say("resuming after epoch %d from %s", epoch, found[max(found)])
        if run.ctx.is_main:
            truncate_scorefile(run.scorefile, epoch)
        return epoch
    if run.ctx.is_main:
        truncate_scorefile(run.scorefile, 0)  # a run killed before its first checkpoint logged epochs
    if run.args.initial_model:
        run.trainer.load(run.args.initial_model, weights_only=True)
        run.say("model initialised from %s", run.args.initial_model)
    return 0


def validate_and_save(run: Run, epoch: int, valid: EmbeddingData | None) -> None:
    """The validation line of scores.txt (loss, accuracy, EER and minDCF of every trial list) and
    the epoch's checkpoint."""
    a = run.args
    nan = float("nan")
    vloss, vacc = nan, nan
    if valid is not None:
        validation = run.trainer.validate(valid, run.sampling)
        vloss, vacc = validation.loss, validation.accuracy
        if validation.left_out:
            run.say_once(
                f"validation: {' and '.join(validation.left_out)} left out of VLoss: no "
                f"speaker of {a.valid_list} has a class of the training speakers"
            )
    found = {trials: run.enhanced_metrics(trials.key) for trials in TRIAL_LISTS}
    if not run.ctx.is_main:
        return
    values = {"Epoch": epoch, "VLoss": vloss, "Vacc": vacc}
    for trials, metrics in found.items():
        metrics = metrics or {"eer": nan, FIRST_MINDCF: nan}
        values |= {
            f"VEER{trials.scorefile_suffix}": metrics["eer"],
            f"VMINDCF{trials.scorefile_suffix}": metrics[FIRST_MINDCF],
        }
    line = score_line(values, validation=True)
    log.info(line)
    options = {key: getattr(a, key) for key in ("model", "trainfunc", "nOut", "activation")}
    run.trainer.save(run.model_dir / CHECKPOINT_NAME.format(epoch), epoch, {"options": options})
    append_line(run.scorefile, line)
    fault_point("trainer.checkpoint")


def truncate_scorefile(scorefile: Path, last_epoch: int) -> None:
    """Drop the lines of epochs after `last_epoch` (written before a crash, to be redone)."""
    if not scorefile.exists():
        return
    kept = [
        line
        for line in scorefile.read_text().splitlines()
        if (epoch := scorefile_epoch(line)) is None or epoch <= last_epoch
    ]
    write_text_atomic(scorefile, "".join(line + "\n" for line in kept))


def scorefile_epoch(line: str) -> int | None:
    """The epoch of a scores.txt line; None for a line that is not one."""
    try:
        return int(parse_score_line(line)[1]["Epoch"])
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# What a save_path was trained with: a run that differs stops, unless --restart says what to do


SETTINGS_RECORD = "training.json"  # in <save_path>/model
# The options that make a training run what it is; max_epoch is left out (training further is a
# new max_epoch), and so are the test lists (they only score it) and the hardware.
TRAINING_SETTINGS = (
    "train_list",
    "train_path",
    "valid_list",
    "valid_path",
    "initial_model",
    "softmax_init",
    "model",
    "nOut",
    "activation",
    "trainfunc",
    "nClasses",
    "sigma",
    "batch_size",
    "seed",
    "max_seg_per_spk",
    "multiple_embedding_flag",
    "nPerSpeaker",
    "da_speakers_per_step",
    "test_interval",
    "optimizer",
    "scheduler",
    "lr",
    "lr_decay",
    "weight_decay",
)
PATH_SETTINGS = ("train_list", "train_path", "valid_list", "valid_path", "initial_model", "softmax_init")
LIST_SETTINGS = ("train_list", "valid_list")  # their content counts too


def training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """This run's TRAINING_SETTINGS (paths made absolute) and the sha256 of its lists' content."""
    found = {key: getattr(args, key) for key in TRAINING_SETTINGS}
    for key in PATH_SETTINGS:
        if found[key]:
            found[key] = str(Path(found[key]).resolve())
    for key in LIST_SETTINGS:
        if getattr(args, key):
            content = Path(getattr(args, key)).read_bytes()
            found[f"{key} content (sha256)"] = hashlib.sha256(content).hexdigest()
    return found


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = dict.fromkeys([*recorded, *current])
    return [
        f"{key} {recorded.get(key)!r} (this run: {current.get(key)!r})"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]


def read_settings_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(read_user_text(path, "settings record"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); m_trainer.py writes it") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected the settings a run was trained with, as m_trainer.py writes them")
    return record


def check_restart(args: argparse.Namespace) -> None:
    """Training into a save_path that holds a run (its checkpoints): go on when this run's data
    and settings are the ones it was trained with (its model/training.json; a run from before the
    record is taken as is). Else a UserError naming the differences, unless --restart resume (go
    on with these) or --restart new (the old run moved to <save_path>/earlier/<time>/ first)."""
    save_path = Path(args.save_path)
    record_path = save_path / "model" / SETTINGS_RECORD
    current = training_settings(args)
    trained = bool(checkpoints(save_path / "model"))
    if trained and args.restart == "new":
        move_run_aside(save_path)
    elif trained:
        recorded = read_settings_record(record_path)
        differ = settings_differences(recorded, current) if recorded is not None else []
        if differ and args.restart is None:
            raise UserError(
                f"{record_path}: {save_path} was trained with other data or settings: "
                f"{'; '.join(differ)}. Use --restart resume to train it further with these, "
                "--restart new to start anew (its model/ and result/ move to "
                f"{save_path / 'earlier'}/), or another save_path"
            )
        if differ:
            log.warning(
                "--restart resume: %s goes on with other data or settings: %s", save_path, "; ".join(differ)
            )
        if recorded == current:
            return
    if not launched_by_torchrun() or os.environ["RANK"] == "0":
        write_text_atomic(record_path, json.dumps(current, indent=1) + "\n")


def move_run_aside(save_path: Path) -> Path:
    """Move a save_path's model/ and result/ to <save_path>/earlier/<time>/ (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = save_path / "earlier" / stamp
    count = 1
    while aside.exists():
        count += 1
        aside = save_path / "earlier" / f"{stamp}-{count}"
    try:
        aside.mkdir(parents=True)
        for name in ("model", "result"):
            if (save_path / name).exists():
                os.replace(save_path / name, aside / name)
            (save_path / name).mkdir()
    except OSError as err:
        raise UserError(
            f"{save_path}: cannot move the earlier run aside to {aside} ({err.strerror})"
        ) from None
    log.info("--restart new: the earlier run of %s moved to %s", save_path, aside)
    return aside


# ----------------------------------------------------------------------------------------------
# --check and --eval: the trial lists scored by every system and back-end (scoring.evaluation)


def trial_list(run: Run, name: str) -> TrialList | None:
    """The trial list `name` as the plain values scoring takes; None when it is not set."""
    trials = run.trials(name)
    if trials is None:
        return None
    return TrialList(
        name,
        str(trials.list_path),
        trials.labels,
        trials.left,
        trials.right,
        trials.files,
        trials.embeddings,
        trials.speaker_of_trials(),
        Quality(trials.durations, trials.norms),
        getattr(run.args, LISTS[name][1]),
        trials.manifest,
        models_of(trials),
    )


def training_set(run: Run) -> TrainingSet | None:
    """The training embeddings the back-ends are fitted on, when a chosen one needs them."""
    if not (needs_training(run.args.backends) and run.args.train_list):
        return None
    train = run.load_data("train")
    return TrainingSet(
        train.embeddings.cpu().numpy(),
        train.row_speakers(),
        run.args.train_list,
        run.args.train_path,
        train.manifest,
    )


def score_lists(run: Run, systems: tuple[str, ...]) -> Results | None:
    """Every trial list of TRIAL_LISTS scored by `systems` with every back-end, the scores saved
    for the viewer (result/trials_<list>.npz); None off the main rank."""
    a = run.args
    settings = Settings(
        a.backends, vars(a), embedding_type_of(a.multiple_embedding_flag).cosine, a.bootstrap, a.seed
    )
    maps = {"original": lambda table: table, "enhanced": run.trainer.enhance}
    lists = [trials for trials in (trial_list(run, t.key) for t in TRIAL_LISTS) if trials is not None]
    results = evaluate(
        lists,
        {system: maps[system] for system in systems},
        settings,
        training_set(run),
        trial_list(run, "calib"),
        run.model_record,
        run.ctx.is_main,
    )
    for name, result in (results.lists if results else {}).items():
        save_trial_scores(
            run.result_dir / result_name(f"trials_{name}.npz", a.result_tag),
            result.trials.labels,
            a.multiple_embedding_flag,
            result.scores,
            trials_source(result.trials),
        )
    return results


def trials_source(trials: TrialList) -> str:
    """What a saved trials_<list>.npz was scored on: the list and its embeddings, as absolute paths."""
    return f"{Path(trials.path).resolve()}\t{Path(trials.embedding_root).resolve()}"


def report(run: Run, results: Results | None, json_name: str) -> None:
    """Print the results table and save its records as result/<json_name> (main rank)."""
    if results is None or not results.lists:
        return
    heading = table_heading(run.args.bootstrap, run.args.eer)
    print(f"\n{heading}\n{records_table(results.records)}", flush=True)
    path = run.result_dir / result_name(json_name, run.args.result_tag)
    write_records(path, results.records)
    run.say("results saved to %s", path)


FIRST_MINDCF = mindcf_key(P_TARGETS[0])  # the minDCF of the --check lines and of scores.txt


def check_line(
    label: str, scores: dict[tuple[str, str], np.ndarray], labels: np.ndarray, eer: str = "roc"
) -> str:
    """The original repository's --check line of one trial list, from the none back-end's scores;
    the original embeddings' values alone without the enhanced ones. `eer`: the EER definition."""
    eer_key = "eer_interpolated" if eer == "interpolated" else "eer"
    found = {
        system: evaluate_scores(scores[(system, "none")], labels)
        for system in SYSTEMS
        if (system, "none") in scores
    }
    words = {"original": "original", "enhanced": "processed"}  # as the original repository printed
    parts = [f"[{label} {words[system]} EER] {values[eer_key]:.4f}" for system, values in found.items()]
    parts += [
        f"[{label} {words[system]} minDCF] {values[FIRST_MINDCF]:.4f}" for system, values in found.items()
    ]
    return ", ".join(parts)


def check_mode(run: Run) -> None:
    """Original vs enhanced EER and minDCF of every trial list, then every back-end with
    intervals; without a trained model the original's alone, as the original repository printed
    them before training."""
    with_model = run.load_trained_model(required=False)
    if not with_model:
        run.say(
            "no trained model yet (%s holds no checkpoint, initial_model is not set): the "
            "original embeddings' EER alone; the enhanced EER needs a model",
            run.model_dir,
        )
    results = score_lists(run, SYSTEMS if with_model else SYSTEMS[:1])
    for trials in TRIAL_LISTS:
        if results is not None and trials.key in results.lists:
            result = results.lists[trials.key]
            print(
                check_line(trials.check_label, result.scores, result.trials.labels, run.args.eer), flush=True
            )
    report(run, results, "check.json")


def eval_mode(run: Run) -> None:
    """The trained model's scores of every trial list: EER, minDCF and threshold per back-end,
    and `score label path1 path2` files (result/eval_scores_<list>[_<back-end>].txt)."""
    run.load_trained_model()
    results = score_lists(run, SYSTEMS[1:])
    for name, result in (results.lists if results else {}).items():
        trials = result.trials
        for (_, backend), scores in result.scores.items():
            metrics = evaluate_scores(scores, trials.labels)
            heading, suffix = (name, "") if backend == "none" else (f"{name} {backend}", f"_{backend}")
            mindcfs = ", ".join(f"minDCF({p:g}) {metrics[mindcf_key(p)]:.4f}" for p in P_TARGETS)
            eer = metrics["eer_interpolated" if run.args.eer == "interpolated" else "eer"]
            print(
                f"[{heading}] EER {eer:.4f}, {mindcfs}, threshold {metrics['threshold']:.6f}, "
                f"trials {len(trials)}",
                flush=True,
            )
            score_path = run.result_dir / result_name(f"eval_scores_{name}{suffix}.txt", run.args.result_tag)
            write_score_file(score_path, scores, trials.labels, trials.left, trials.right, trials.files)
            run.say("per-trial scores written to %s", score_path)
    report(run, results, "eval.json")


def generate_mode(run: Run) -> None:
    """The enhanced embedding of every gen_list entry, written in the kind gen_format names (by
    default gen_path's kind): <gen_target_dir>/<entry>.npy, a Kaldi .scp/.ark (a tree's entries
    keyed `.wav`, as the trial lists name them) or a packed store; then gen_path's utt2dur and
    manifest.json beside them, so that QMF and the viewer know what the embeddings saw."""
    a = run.args
    run.load_trained_model()
    files = [rel for _, rel in read_list(a.gen_list, "normal")]
    embeddings = load_embeddings(a.gen_path, files, a.nOut, a.nDataLoaderThread, desc="loading gen_list")
    enhanced = run.trainer.enhance(embeddings)
    if not run.ctx.is_main:
        return
    kind = generated_kind(a.gen_path, a.gen_format)
    target = generated_target(a)
    folders, names = kind.gen_written(target, files)
    clear_leftovers(sorted(folders), f"{names}|utt2dur|manifest\\.json", target)
    keys = [kaldi_key(rel) for rel in files] if kind.name == "kaldi" else files
    target = kind.write(target, keys, enhanced.astype(np.float32))
    log.info("wrote %d enhanced embeddings (%s) to %s", len(files), kind.name, target)
    checkpoint = (run.model_record or {}).get("checkpoint")
    write_side_files(
        a.gen_path, target, files, keys, {"enhanced_by": checkpoint, "enhanced_from": a.gen_path}
    )


def generated_target(args: argparse.Namespace) -> Path:
    """Where --generate writes: <gen_target_dir> (a tree), its xvector.scp or <gen_target_dir>.store."""
    return generated_kind(args.gen_path, args.gen_format).gen_target(
        Path(args.save_path) / args.gen_target_dir
    )


def generate_lock(args: argparse.Namespace) -> AbstractContextManager:
    """One --generate at a time writes into a target: the lock of gen_target_dir where the target is
    that folder or in it (a tree, a .scp), else (a packed store, a folder replaced whole, beside
    gen_target_dir in save_path) a lock file named after the target beside it."""
    gen_dir = Path(args.save_path) / args.gen_target_dir
    target = generated_target(args)
    folder = target if target == gen_dir else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create the folder of --generate ({err.strerror})") from None
    name = LOCK_NAME if folder == gen_dir else f".{target.name}{LOCK_NAME}"
    return run_lock(folder, "gen_target_dir", name)


# ----------------------------------------------------------------------------------------------
# Entry points


MODES = {"train": train_mode, "check": check_mode, "eval": eval_mode, "generate": generate_mode}


def run(ctx: DistContext, args: argparse.Namespace, mode: str) -> None:
    setup_logging()
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    MODES[mode](Run(args, ctx))


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_options(argv)
    mode = mode_of(args)
    check_setup(args, mode)
    if args.mixedprec and not torch.cuda.is_available():
        log.info("--mixedprec needs CUDA: ignored on CPU")
    log.info("save_path %s", args.save_path)
    with mode_lock(args, mode):
        if mode == "train":
            check_restart(args)
            clear_training_leftovers(Path(args.save_path))
        launch(
            run,
            (args, mode),
            distributed=args.distributed,
            device=args.device,
            nprocs=args.nprocs,
            port=args.port,
        )


def mode_lock(args: argparse.Namespace, mode: str) -> AbstractContextManager:
    """Training writes checkpoints and scores.txt: one training run at a time in a save_path.
    --generate: one at a time into its target. --check and --eval only write whole files of their
    own, so they may run beside either."""
    if mode == "train":
        return run_lock(args.save_path, "save_path")
    return generate_lock(args) if mode == "generate" else nullcontext()


def clear_training_leftovers(save_path: Path) -> None:
    """The temporaries of a killed training run: of its checkpoints, its settings record and its
    scores.txt (not those of a --check or --eval, which may be running)."""
    model_names = f"{CHECKPOINT_PATTERN.pattern.strip('^$')}|{re.escape(SETTINGS_RECORD)}"
    clear_leftovers([save_path / "model"], model_names, save_path)
    clear_leftovers([save_path / "result"], re.escape("scores.txt"), save_path)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
