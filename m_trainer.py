"""Train, check, evaluate or apply a speaker-embedding enhancement network.

    python ./m_trainer.py --config configs/MyLinearNetv2_Exp6-4.yaml
    python ./m_trainer.py --config configs/X.yaml --check      # original vs processed EER
    python ./m_trainer.py --config configs/X.yaml --generate   # write enhanced embeddings

Options come from the defaults below, then the YAML config, then the options written on the
command line (which win).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from loss.m_Losses import loss_class
from m_DataLoader import EmbeddingData, TrialSet, embedding_type_of, load_embeddings, read_list
from m_network import CHECKPOINT_NAME, OPTIMIZERS, SCHEDULERS, SpeakerNet, Trainer, checkpoints
from m_scoring import (
    BACKENDS,
    NONE_ALIASES,
    SYSTEMS,
    Backend,
    Calibration,
    decision_records,
    evaluate_scores,
    make_backend,
    results_table,
    trial_list_records,
)
from m_utils import (
    HARDWARE_OPTIONS,
    DistContext,
    Options,
    UserError,
    add_options,
    append_line,
    atomic_write,
    launch,
    parse_score_line,
    read_user_text,
    resolve_device,
    run_lock,
    run_main,
    save_npy_atomic,
    score_line,
    setup_logging,
    unknown_name,
    write_text_atomic,
)
from models.m_Models import make_activation, model_class

log = logging.getLogger("m_trainer")

OPTIONS: Options = {
    "config": (None, str, "YAML config file"),
    # Data loader
    "batch_size": (1000, int, "samples per step and process (DA losses: see da_speakers_per_step)"),
    "nDataLoaderThread": (5, int, "threads that read embedding files (0: the main thread)"),
    "seed": (10, int, "seed of every random choice"),
    "max_seg_per_spk": (500, int, "utterances per speaker and epoch with nPerSpeaker > 1"),
    "multiple_embedding_flag": ("B", str, "B: avg-norm-avg target, L2 scoring; C: avg-avg-norm, cosine"),
    "triplet": (False, bool, "not used: kept so old configs load (the list type follows the loss)"),
    "nPerSpeaker": (1, int, "utterances of one speaker grouped in a batch"),
    "da_speakers_per_step": (1, int, "speakers per step for the DA losses (the original repository used 1)"),
    # Training
    "test_interval": (5, int, "validate, test and save every this many epochs"),
    "max_epoch": (100, int, "epochs to train"),
    "trainfunc": ("MSE", str, "loss name"),
    "optimizer": ("adam", str, "adam, adamw or sgd"),
    "scheduler": ("steplr", str, "steplr, cosine or none"),
    "lr": (0.001, float, "learning rate"),
    "lr_decay": (0.95, float, "steplr: factor every test_interval epochs"),
    "weight_decay": (0.0, float, "weight decay"),
    "margin": (0.1, float, "not used: kept so old configs load (no loss has a margin)"),
    "scale": (30.0, float, "not used: kept so old configs load (no loss has a scale)"),
    "nClasses": (5994, int, "Softmax classes (at least the training speakers)"),
    "sigma": (1.0, float, "RBF kernel width of the DA losses"),
    "softmax_init": (None, str, "extractor checkpoint whose __L__.softmax.fc.* start the Softmax layer"),
    # Scoring (--check and --eval)
    "backends": (("none", "asnorm"), list, "scoring back-ends of --check and --eval: none, mean, asnorm, "
                 "plda (none is always scored)"),
    "asnorm_topk": (300, int, "AS-Norm: the top cohort scores averaged on each side of a trial"),
    "lda_dim": (200, int, "PLDA: dimension of the LDA before it (at most nOut-1 and speakers-1)"),
    "bootstrap": (1000, int, "resamples of the test speakers for the 95 %% intervals of the EER"),
    "calib_list": (None, str, "trial list over held-out embeddings to calibrate scores on"),
    "calib_path": (None, str, "embedding root of calib_list"),
    # Paths
    "initial_model": (None, str, "start from (or, with --check/--eval/--generate, use) this model"),
    "save_path": (None, str, "experiment folder (default exp_emb/<config name>)"),
    "train_list": (None, str, "training list"),
    "valid_list": (None, str, "validation list (same type as the training list)"),
    "test_list": (None, str, "in-domain trial list"),
    "test_list_libri": (None, str, "out-of-domain (LibriSpeech) trial list"),
    "train_path": (None, str, "embedding root of train_list"),
    "valid_path": (None, str, "embedding root of valid_list"),
    "test_path": (None, str, "embedding root of test_list"),
    "test_path_libri": (None, str, "embedding root of test_list_libri"),
    # Model
    "model": ("MyLinearNetv2", str, "enhancement model name"),
    "nOut": (512, int, "embedding dimension"),
    "activation": ("ReLU", str, "ReLU or ELU"),
    # Modes
    "eval": (False, bool, "score the test lists with a trained model, no training"),
    "check": (False, bool, "original vs processed EER on both test lists"),
    "generate": (False, bool, "write the enhanced embedding of every gen_list entry"),
    "gen_list": (None, str, "normal list of the embeddings to enhance"),
    "gen_path": (None, str, "embedding root of gen_list"),
    "gen_target_dir": ("enhanced", str, "folder under save_path for generated embeddings"),
    **HARDWARE_OPTIONS,
}
# Options of the original repository that nothing here uses; setting one says so.
UNUSED_OPTIONS = ("triplet", "margin", "scale")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    add_options(parser, OPTIONS, with_defaults=not suppress_defaults)
    return parser


def check_config_value(path: Path, key: str, value: Any) -> Any:
    """A config value converted to its option's type, or an error naming key and file."""
    if key not in OPTIONS:
        close = difflib.get_close_matches(key, OPTIONS, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{path}: unknown option '{key}'{hint}")
    default, kind, _ = OPTIONS[key]
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
        raise UserError(f"{path}: option '{key}' must be of type {kind_name}, "
                        f"found {type(value).__name__} {value!r}")
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
    return {str(key): check_config_value(config_path, str(key), value)
            for key, value in loaded.items()}


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults, then the config, then options written on the command line."""
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    given = set(explicit)
    if args.config:
        config = read_config(args.config)
        given |= set(config)
        for key, value in config.items():
            if key not in explicit and key != "config":
                setattr(args, key, value)
        if args.save_path is None:
            args.save_path = str(Path("exp_emb") / Path(args.config).stem)
    if args.save_path is None:
        args.save_path = "exp_emb/default"
    for key in sorted(given & set(UNUSED_OPTIONS)):
        log.warning("option '%s' is not used: it is accepted so that the original repository's configs "
                    "load", key)
    return args


# ----------------------------------------------------------------------------------------------
# Checks before any work


LIST_MAKER = "m_gen_list.py"
EMBED_MAKER = "m_gen_embs.py and m_comb_embs.py"
# Paths each mode needs: (list option, its embedding root); `optional` pairs are checked when set.
PAIRS = {"train": ("train_list", "train_path"), "valid": ("valid_list", "valid_path"),
         "test": ("test_list", "test_path"), "libri": ("test_list_libri", "test_path_libri"),
         "gen": ("gen_list", "gen_path"), "calib": ("calib_list", "calib_path")}
MODE_PATHS = {"train": {"required": ("test", "train"), "optional": ("libri", "valid")},
              "check": {"required": ("test",), "optional": ("libri", "calib")},
              "eval": {"required": ("test",), "optional": ("libri", "calib")},
              "generate": {"required": ("gen",), "optional": ()}}


def mode_of(args: argparse.Namespace) -> str:
    """The run's mode: check, eval or generate when asked for (in that order), else train."""
    return next((mode for mode in ("check", "eval", "generate") if getattr(args, mode)), "train")


def require_path(args: argparse.Namespace, key: str, maker: str) -> Path:
    value = getattr(args, key)
    if not value:
        raise UserError(f"option '{key}' is not set (in the config or as --{key})")
    path = Path(value)
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist ({maker} makes it)")
    return path


def check_paths(args: argparse.Namespace) -> None:
    """The lists and embedding roots the mode needs exist; optional ones are checked when set."""
    mode = mode_of(args)
    needs = MODE_PATHS[mode]
    chosen = list(needs["required"]) + [name for name in needs["optional"] if getattr(args, PAIRS[name][0])]
    if mode in ("check", "eval") and trained_backends(args) and args.train_list:
        chosen.append("train")  # the back-ends are fitted on the training embeddings
    for name in chosen:
        list_key, path_key = PAIRS[name]
        require_path(args, list_key, LIST_MAKER)
        require_path(args, path_key, EMBED_MAKER)
    if args.initial_model:
        require_path(args, "initial_model", "m_trainer.py or the original repository")


def trained_backends(args: argparse.Namespace) -> list[str]:
    """The chosen back-ends that are fitted on training embeddings (all but none); without a
    train_list they are skipped."""
    return [name for name in args.backends if name != "none"]


def check_setup(args: argparse.Namespace) -> None:
    for key in ("batch_size", "test_interval", "max_epoch", "nPerSpeaker", "nOut", "nClasses",
                "da_speakers_per_step", "max_seg_per_spk", "nprocs", "asnorm_topk", "lda_dim",
                "bootstrap"):
        if getattr(args, key) < 1:
            raise UserError(f"option '{key}' must be at least 1, found {getattr(args, key)}")
    if args.nDataLoaderThread < 0:
        raise UserError(f"option 'nDataLoaderThread' must be 0 or more, found {args.nDataLoaderThread}")
    embedding_type_of(args.multiple_embedding_flag)
    for name in args.backends:
        if name not in BACKENDS:
            raise unknown_name("back-end", name, BACKENDS)
    loss_class(args.trainfunc)
    model_class(args.model)
    make_activation(args.activation)
    if args.optimizer not in OPTIMIZERS:
        raise unknown_name("optimizer", args.optimizer, OPTIMIZERS)
    if args.scheduler not in SCHEDULERS:
        raise unknown_name("scheduler", args.scheduler, SCHEDULERS)
    resolve_device(args.device)
    check_paths(args)
    save_path = Path(args.save_path)
    try:
        (save_path / "result").mkdir(parents=True, exist_ok=True)
        (save_path / "model").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_path / "result"):  # a unique name: runs may share it
            pass
    except OSError as err:
        raise UserError(f"save_path {save_path} is not writable ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------
# The run


TRIAL_LABELS = {"test": "testset", "libri": "libriset"}  # trial list -> its name in --check lines


class Experiment:
    """One process's view of a run: options, device, data, trainer."""

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
        self.trainer = Trainer(self.net, self.device, ctx, optimizer=args.optimizer,
                               scheduler=args.scheduler, lr=args.lr, lr_decay=args.lr_decay,
                               weight_decay=args.weight_decay, test_interval=args.test_interval,
                               max_epoch=args.max_epoch, mixedprec=args.mixedprec)
        self.trial_sets: dict[str, TrialSet] = {}
        self.notes_said: set[str] = set()

    def say(self, message: str, *params) -> None:
        if self.ctx.is_main:
            log.info(message, *params)

    def say_once(self, message: str) -> None:
        if message not in self.notes_said:
            self.notes_said.add(message)
            self.say("%s", message)

    # -- data --------------------------------------------------------------------------------

    def load_data(self, name: str, speakers=None) -> EmbeddingData:
        a = self.args
        list_key, path_key = PAIRS[name]
        return EmbeddingData(getattr(a, list_key), getattr(a, path_key), self.loss_kind,
                             a.multiple_embedding_flag, a.nOut, self.device, speakers,
                             threads=a.nDataLoaderThread)

    def trials(self, name: str) -> TrialSet | None:
        """The trial list `name` (test, libri, calib) with its embeddings, read once; None (said
        once for a test list) when it is not set."""
        list_key, path_key = PAIRS[name]
        if not getattr(self.args, list_key):
            if name in TRIAL_LABELS:
                self.say_once(f"{'LibriSpeech' if name == 'libri' else name} trial list not set: skipped")
            return None
        if name not in self.trial_sets:
            self.trial_sets[name] = TrialSet(getattr(self.args, list_key), getattr(self.args, path_key),
                                             self.args.nOut, self.args.nDataLoaderThread)
        return self.trial_sets[name]

    def sampling(self) -> dict[str, int]:
        a = self.args
        return {"n_per_speaker": a.nPerSpeaker, "max_seg_per_spk": a.max_seg_per_spk,
                "speakers_per_step": a.da_speakers_per_step}

    # -- modes --------------------------------------------------------------------------------

    def trained_model(self) -> Path | None:
        """The model for --check/--eval/--generate: initial_model, else the newest checkpoint."""
        if self.args.initial_model:
            return Path(self.args.initial_model)
        found = checkpoints(self.model_dir)
        return found[max(found)] if found else None

    def load_trained_model(self, required: bool = True) -> bool:
        """Load the trained model; without one, a UserError when `required`, else False."""
        path = self.trained_model()
        if path is None:
            if required:
                raise UserError(f"no trained model: {self.model_dir} holds no checkpoint and "
                                "initial_model is not set")
            return False
        self.trainer.load(path, weights_only=True)
        self.say("model loaded from %s", path)
        return True

    def processed_metrics(self, name: str) -> dict[str, float] | None:
        """EER and minDCF of the processed embeddings on one trial list, at validation. Every rank
        takes part; the main rank alone gets the result."""
        trials = self.trials(name)
        if trials is None:
            return None
        processed = self.trainer.processed_scores(trials, self.args.multiple_embedding_flag)
        return evaluate_scores(processed, trials.labels) if self.ctx.is_main else None

    # -- scoring with back-ends (--check, --eval) ---------------------------------------------

    def system_tables(self, embeddings: np.ndarray, systems: tuple[str, ...]) -> dict[str, np.ndarray]:
        """`embeddings` as each system sees them: as they are (original), through the model
        (enhanced). Every rank takes part (enhancing is shared out under DDP)."""
        return {system: embeddings if system == "original" else self.trainer.enhance(embeddings)
                for system in systems}

    def fit_backends(self, systems: tuple[str, ...]) -> dict[tuple[str, str], Backend]:
        """Every (system, back-end) scorer, the back-ends fitted on the training embeddings passed
        through the same system. `none` is always among them: the --check lines report it."""
        a = self.args
        trained = trained_backends(a)
        if trained and not a.train_list:
            self.say("back-end(s) %s skipped: they are fitted on the training embeddings, and train_list "
                     "is not set", ", ".join(trained))
            trained = []
        backends = {(system, name): make_backend(name, a.multiple_embedding_flag, a.asnorm_topk, a.lda_dim)
                    for system in systems for name in ["none", *trained]}
        if not trained:
            return backends
        train = self.load_data("train")
        tables = self.system_tables(train.embeddings.cpu().numpy(), systems)
        speakers = train.row_speakers()
        if self.ctx.is_main:
            for (system, name), backend in backends.items():
                if name != "none":
                    began = time.perf_counter()
                    backend.fit(tables[system], speakers)
                    self.say("%s back-end of the %s embeddings fitted on %d training utterances of %d "
                             "speakers in %.1f s", name, system, len(speakers), len(set(speakers.tolist())),
                             time.perf_counter() - began)
        return backends

    def backend_scores(self, trials: TrialSet, backends: dict[tuple[str, str], Backend],
                       systems: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray] | None:
        """Scores of every (system, back-end) on a trial list; None off the main rank."""
        tables = self.system_tables(trials.embeddings, systems)
        if not self.ctx.is_main:
            return None
        return {key: backend.score(tables[key[0]], trials.left, trials.right)
                for key, backend in backends.items()}

    def calibrations(self, backends: dict[tuple[str, str], Backend],
                     systems: tuple[str, ...]) -> dict[tuple[str, str], Calibration]:
        """A Calibration of every (system, back-end) on calib_list's trials, if it is set."""
        trials = self.trials("calib")
        if trials is None:
            return {}
        scores = self.backend_scores(trials, backends, systems)
        if scores is None:
            return {}
        return {key: Calibration.fit(values, trials.labels) for key, values in scores.items()}

    def score_with_backends(self, systems: tuple[str, ...]) -> tuple[dict[str, dict], list[dict]]:
        """Score both trial lists with every (system, back-end), save the trial scores for the
        viewer, and make the records of the results (intervals, and calibration when calib_list is
        set). Returns per trial list its TrialSet and scores, and the records (main rank)."""
        a = self.args
        backends = self.fit_backends(systems)
        calibrations = self.calibrations(backends, systems)
        results, records = {}, []
        for name in TRIAL_LABELS:
            trials = self.trials(name)
            if trials is None:
                continue
            scores = self.backend_scores(trials, backends, systems)
            if scores is None:
                continue
            results[name] = {"trials": trials, "scores": scores}
            self.save_trial_scores(name, trials, scores)
            records += trial_list_records(name, scores, trials.labels, trials.speaker_of_trials(),
                                          calibrations, resamples=a.bootstrap, seed=a.seed)
            records += decision_records(name, scores, trials.labels, calibrations)
        records += [{"trials": "calib", "system": system, "backend": backend, **calibration.as_dict()}
                    for (system, backend), calibration in calibrations.items()]
        return results, records

    def report(self, records: list[dict], json_name: str) -> None:
        """Print the results table and save its records as result/<json_name> (main rank)."""
        if not self.ctx.is_main or not records:
            return
        print(f"\nEER in % with its 95 % interval over {self.args.bootstrap} resamples of the test "
              f"speakers; minDCF at P_target 0.05 and 0.01:\n{results_table(records)}", flush=True)
        path = self.result_dir / json_name
        write_text_atomic(path, json.dumps(records, indent=1) + "\n")
        self.say("results saved to %s", path)

    def save_trial_scores(self, name: str, trials: TrialSet,
                          scores: dict[tuple[str, str], np.ndarray]) -> Path:
        """result/trials_<name>.npz: labels, embedding type, and the scores of every (system,
        back-end) as `<system>/<back-end>`; `original` and `processed` are the none back-end's."""
        arrays = {f"{system}/{backend}": values for (system, backend), values in scores.items()}
        arrays.update({alias: scores[(system, "none")] for alias, system in NONE_ALIASES.items()
                       if (system, "none") in scores})
        path = self.result_dir / f"trials_{name}.npz"
        atomic_write(path, lambda handle: np.savez(
            handle, labels=trials.labels, embedding_type=np.array(self.args.multiple_embedding_flag),
            **arrays))
        return path

    def check(self) -> None:
        """Original vs processed EER and minDCF of both trial lists, then every back-end with
        intervals; without a trained model the original's alone, as the original repository
        printed them before training."""
        with_model = self.load_trained_model(required=False)
        if not with_model:
            self.say("no trained model yet (%s holds no checkpoint, initial_model is not set): the "
                     "original embeddings' EER alone; the processed EER needs a model", self.model_dir)
        systems = SYSTEMS if with_model else SYSTEMS[:1]
        results, records = self.score_with_backends(systems)
        for name, label in TRIAL_LABELS.items():
            if name not in results:
                continue
            scores, labels = results[name]["scores"], results[name]["trials"].labels
            o = evaluate_scores(scores[("original", "none")], labels)
            if not with_model:
                print(f"[{label} original EER] {o['eer']:.4f}, [{label} original minDCF] {o['mindcf']:.4f}",
                      flush=True)
                continue
            p = evaluate_scores(scores[("enhanced", "none")], labels)
            print(f"[{label} original EER] {o['eer']:.4f}, [{label} processed EER] {p['eer']:.4f}, "
                  f"[{label} original minDCF] {o['mindcf']:.4f}, "
                  f"[{label} processed minDCF] {p['mindcf']:.4f}", flush=True)
        self.report(records, "check.json")

    def evaluate(self) -> None:
        """The trained model's scores of both trial lists: EER, minDCF and threshold per back-end,
        and `score label path1 path2` files (result/eval_scores_<list>[_<back-end>].txt)."""
        self.load_trained_model()
        results, records = self.score_with_backends(SYSTEMS[1:])
        for name, result in results.items():
            trials = result["trials"]
            for (_, backend), scores in result["scores"].items():
                p = evaluate_scores(scores, trials.labels)
                heading = name if backend == "none" else f"{name} {backend}"
                print(f"[{heading}] EER {p['eer']:.4f}, minDCF(0.05) {p['mindcf']:.4f}, "
                      f"minDCF(0.01) {p['mindcf01']:.4f}, threshold {p['threshold']:.6f}, "
                      f"trials {len(trials)}", flush=True)
                lines = [f"{score:.6f} {target} {trials.files[i]} {trials.files[j]}"
                         for score, target, i, j in zip(scores, trials.labels, trials.left, trials.right,
                                                        strict=True)]
                suffix = "" if backend == "none" else f"_{backend}"
                score_path = self.result_dir / f"eval_scores_{name}{suffix}.txt"
                write_text_atomic(score_path, "\n".join(lines) + "\n")
                self.say("per-trial scores written to %s", score_path)
        self.report(records, "eval.json")

    def generate(self) -> None:
        self.load_trained_model()
        records = read_list(self.args.gen_list, "normal")
        files = [rel for _, rel in records]
        embeddings = load_embeddings(self.args.gen_path, files, self.args.nOut,
                                     self.args.nDataLoaderThread, desc="loading gen_list")
        enhanced = self.trainer.enhance(embeddings)
        if not self.ctx.is_main:
            return
        target = self.save_path / self.args.gen_target_dir
        for rel, row in zip(files, enhanced, strict=True):
            save_npy_atomic((target / rel).with_suffix(".npy"), row[None, :].astype(np.float32))
        log.info("wrote %d enhanced embeddings under %s", len(files), target)

    # -- training ----------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore the newest complete checkpoint (or initial_model); returns the last epoch done."""
        found = checkpoints(self.model_dir)
        if found:
            epoch = self.trainer.load(found[max(found)])
            self.say("resuming after epoch %d from %s", epoch, found[max(found)])
            if self.ctx.is_main:
                truncate_scorefile(self.scorefile, epoch)
            return epoch
        if self.args.initial_model:
            self.trainer.load(self.args.initial_model, weights_only=True)
            self.say("model initialised from %s", self.args.initial_model)
        return 0

    def train(self) -> None:
        a = self.args
        train_data = self.load_data("train")
        if self.net.loss.classifies and a.nClasses < len(train_data.speakers):
            raise UserError(f"nClasses {a.nClasses} is smaller than the {len(train_data.speakers)} "
                            f"training speakers of {a.train_list}")
        valid = self.load_data("valid", train_data.speakers) if a.valid_list else None
        self.trials("test")
        self.trials("libri")
        if self.loss_kind == "distribution":
            self.say("DA loss: %d speaker(s) per step and process (da_speakers_per_step); "
                     "batch_size %d is not used", a.da_speakers_per_step, a.batch_size)
        self.say("training %s + %s on %d samples of %d speakers, %s, %d process(es)", a.model,
                 a.trainfunc, len(train_data), train_data.num_speakers, self.device, self.ctx.world_size)
        start = self.resume() + 1
        for epoch in range(start, a.max_epoch + 1):
            began, lr = time.perf_counter(), self.trainer.lr
            loss = self.trainer.train_epoch(train_data, epoch, a.batch_size, a.seed, **self.sampling())
            self.say("epoch %d: loss %.6f, lr %.6f, %.1f s", epoch, loss, lr, time.perf_counter() - began)
            if self.ctx.is_main:
                append_line(self.scorefile, score_line({"Epoch": epoch, "TLOSS": loss, "LR": lr},
                                                       validation=False))
            if epoch % a.test_interval == 0 or epoch == a.max_epoch:
                self.validate_and_save(epoch, valid)

    def validate_and_save(self, epoch: int, valid: EmbeddingData | None) -> None:
        a = self.args
        nan = float("nan")
        vloss, vacc = nan, nan
        if valid is not None:
            validation = self.trainer.validate(valid, a.batch_size, a.seed, **self.sampling())
            vloss, vacc = validation.loss, validation.accuracy
            if validation.left_out:
                self.say_once(f"validation: {' and '.join(validation.left_out)} left out of VLoss: no "
                              f"speaker of {a.valid_list} has a class of the training speakers")
        found = {name: self.processed_metrics(name) for name in TRIAL_LABELS}
        if not self.ctx.is_main:
            return
        metrics = {name: result or {"eer": nan, "mindcf": nan} for name, result in found.items()}
        line = score_line({"Epoch": epoch, "VLoss": vloss, "VEER": metrics["test"]["eer"],
                           "VEER_LIBRI": metrics["libri"]["eer"], "Vacc": vacc,
                           "VMINDCF": metrics["test"]["mindcf"],
                           "VMINDCF_LIBRI": metrics["libri"]["mindcf"]}, validation=True)
        log.info(line)
        options = {key: getattr(a, key) for key in ("model", "trainfunc", "nOut", "activation")}
        self.trainer.save(self.model_dir / CHECKPOINT_NAME.format(epoch), epoch, {"options": options})
        append_line(self.scorefile, line)


def truncate_scorefile(scorefile: Path, last_epoch: int) -> None:
    """Drop the lines of epochs after `last_epoch` (written before a crash, to be redone)."""
    if not scorefile.exists():
        return
    kept = [line for line in scorefile.read_text().splitlines()
            if (epoch := scorefile_epoch(line)) is None or epoch <= last_epoch]
    write_text_atomic(scorefile, "".join(line + "\n" for line in kept))


def scorefile_epoch(line: str) -> int | None:
    """The epoch of a scores.txt line; None for a line that is not one."""
    try:
        return int(parse_score_line(line)[1]["Epoch"])
    except ValueError:
        return None


def run(ctx: DistContext, args: argparse.Namespace) -> None:
    setup_logging()
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    experiment = Experiment(args, ctx)
    if args.check:
        experiment.check()
    elif args.eval:
        experiment.evaluate()
    elif args.generate:
        experiment.generate()
    else:
        experiment.train()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_options(argv)
    check_setup(args)
    if args.mixedprec and not torch.cuda.is_available():
        log.info("--mixedprec needs CUDA: ignored on CPU")
    log.info("save_path %s", args.save_path)
    # Training writes checkpoints and scores.txt: one training run at a time in a save_path.
    # --check, --eval and --generate only write whole files, so they may run beside it.
    training = not (args.check or args.eval or args.generate)
    with run_lock(args.save_path, "save_path") if training else nullcontext():
        launch(run, (args,), distributed=args.distributed, device=args.device, nprocs=args.nprocs,
               port=args.port)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
