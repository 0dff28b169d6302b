import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config, run_script, train

import m_trainer
import m_utils
from loss.m_Losses import LOSSES
from m_DataLoader import EmbeddingData, Sampling
from m_network import SpeakerNet, Trainer, checkpoints, parse_score_line, score_line
from m_utils import FAULT_EXIT_STATUS, FAULT_VARIABLE, UserError, hyper_parameters


@pytest.mark.parametrize("trainfunc", sorted(LOSSES))
def test_every_loss_trains_an_epoch(data, tmp_path, trainfunc):
    kind = LOSSES[trainfunc].list_kind
    lists = data / "lists"
    cfg = config(
        data,
        tmp_path,
        trainfunc=trainfunc,
        max_epoch=1,
        train_list=str(lists / f"train_{kind}_list.txt"),
        valid_list=str(lists / f"train_{kind}_list.txt"),
    )
    lines = train(cfg, tmp_path / "exp")
    assert len(lines) == 2
    assert parse_score_line(lines[0])[0] is False
    validation, values = parse_score_line(lines[1])
    assert validation and np.isfinite(values["VLoss"]) and 0 <= values["VEER"] <= 100
    assert 0 <= values["VEER_LIBRI"] <= 100 and np.isfinite(values["VMINDCF_LIBRI"])
    if not LOSSES[trainfunc].reports_accuracy:
        assert values["Vacc"] == -1.0  # as the original wrote it for a loss without accuracy
    elif trainfunc.startswith("DA"):
        assert values["Vacc"] >= 0  # the MMD
    else:
        assert 0 <= values["Vacc"] <= 100
    assert sorted(checkpoints(tmp_path / "exp" / "model")) == [1]


@pytest.mark.parametrize("trainfunc", ["MSE_CS", "MSE_Softmax", "MyTriplet_CS", "DA_MSE"])
def test_trainer_epochs_equal_a_plain_loop(data, trainfunc):
    """The Trainer's epoch gives the weights and the mean loss of a plain loop over the same
    batches: gradients dropped each step (torch's default; the Trainer zeroes them in place on a
    CPU), the loss read back each step."""
    kind = LOSSES[trainfunc].list_kind
    train_data = EmbeddingData(data / "lists" / f"train_{kind}_list.txt", data / "train", kind, "B", 24)
    sampling = Sampling(batch_size=32, seed=5)
    results = {}
    for way in ("trainer", "loop"):
        torch.manual_seed(3)
        trainer = Trainer(SpeakerNet("MyLinearNetv2", trainfunc, nOut=24, nClasses=40), torch.device("cpu"))
        if way == "trainer":
            mean_loss = trainer.train_epoch(train_data, 1, sampling)
        else:
            torch.manual_seed(5 + 1)
            trainer.net.train()
            total, count = 0.0, 0
            for batch in train_data.batches(1, sampling):
                trainer.optimizer.zero_grad(set_to_none=True)
                loss = trainer.net(batch)[0]
                loss.backward()
                trainer.optimizer.step()
                total, count = total + loss.item() * batch.size, count + batch.size
            mean_loss = total / count
            assert all(p.grad is not None for p in trainer.net.parameters() if p.requires_grad)
        results[way] = (mean_loss, trainer.net.state_dict())
    (mean_loss, state), (loop_loss, loop_state) = results["trainer"], results["loop"]
    assert mean_loss == pytest.approx(loop_loss, rel=1e-12)
    for name, value in state.items():
        torch.testing.assert_close(value, loop_state[name], rtol=0, atol=0, msg=name)


def test_score_lines_keep_the_original_format():
    train = score_line({"Epoch": 7, "TLOSS": 0.25, "LR": 0.00095}, validation=False)
    assert train == "Epoch 7, TLOSS 0.250000, LR 0.000950"
    val = score_line(
        {
            "Epoch": 10,
            "VLoss": 0.5,
            "VEER": 3.14159,
            "VEER_LIBRI": float("nan"),
            "Vacc": -0.0,
            "VMINDCF": 0.41234,
            "VMINDCF_LIBRI": 0.5,
        },
        validation=True,
    )
    assert val == (
        "--Val-- Epoch 10, VLoss 0.500000, VEER 3.1416, VEER_LIBRI nan, Vacc 0.0000, "
        "VMINDCF 0.4123, VMINDCF_LIBRI 0.5000"
    )
    assert parse_score_line(train) == (False, {"Epoch": 7.0, "TLOSS": 0.25, "LR": 0.00095})
    _, values = parse_score_line("--Val-- Epoch 2, VLoss 1.1, VEER 20.0, VEER_LIBRI 25.5, Vacc -1.0000")
    assert values["Vacc"] == -1.0 and np.isnan(values["VMINDCF"])  # the original's line, no minDCF
    with pytest.raises(ValueError, match="expected a line like"):
        parse_score_line("Epoch 1, TLOSS 0.1")


def check_lines(output: str) -> dict[str, tuple[float, float]]:
    found = {}
    for name, original, processed in re.findall(
        r"\[(\w+) original EER\] ([\d.]+), \[\w+ processed EER\] ([\d.]+)", output
    ):
        found[name] = (float(original), float(processed))
    return found


def test_mse_cs_learns_the_session_offset(data, tmp_path, capsys):
    cfg = config(
        data,
        tmp_path,
        trainfunc="MSE_CS",
        max_epoch=20,
        test_interval=20,
        multiple_embedding_flag="C",
        batch_size=8,
    )
    train(cfg, tmp_path / "exp")
    capsys.readouterr()
    m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / "exp"), "--check"])
    found = check_lines(capsys.readouterr().out)
    original, processed = found["testset"]
    assert original > 5 and processed < original - 2
    assert "libriset" in found
    assert (tmp_path / "exp" / "result" / "trials_test.npz").is_file()


def final_weights(save: Path) -> dict[str, torch.Tensor]:
    found = checkpoints(save / "model")
    return torch.load(found[max(found)], weights_only=True)["network"]


def test_identical_runs_and_resume_after_interruption(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="MSE", model="MyLinearNet", max_epoch=4, test_interval=2)
    first = train(cfg, tmp_path / "a")
    assert train(cfg, tmp_path / "b") == first
    # An interrupted run: stopped after epoch 2's checkpoint, with epoch 3 logged and a
    # half-written checkpoint left behind.
    train(cfg, tmp_path / "c", "--max_epoch", "2")
    scores = tmp_path / "c" / "result" / "scores.txt"
    scores.write_text(scores.read_text() + "Epoch 3, TLOSS 9.999999, LR 0.001000\n")
    (tmp_path / "c" / "model" / ".model000000004.model.x.tmp").write_bytes(b"partial")
    resumed = train(cfg, tmp_path / "c")
    assert resumed == first
    assert sum(line.startswith("Epoch 3,") for line in resumed) == 1
    for key, value in final_weights(tmp_path / "a").items():
        assert torch.equal(value, final_weights(tmp_path / "c")[key]), key


def test_generate_and_eval(data, tmp_path, capsys):
    cfg = config(
        data,
        tmp_path,
        trainfunc="CS",
        gen_list=str(data / "lists" / "libri_normal_list.txt"),
        gen_path=str(data / "libri"),
    )
    save = tmp_path / "exp"
    train(cfg, save, "--max_epoch", "1")
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--generate"])
    written = sorted((save / "enhanced").rglob("*.npy"))
    assert len(written) == len(sorted((data / "libri").glob("*/*/*.npy")))
    first = np.load(written[0])
    assert first.shape == (1, 24) and abs(np.linalg.norm(first) - 1) < 1e-5
    assert written[0].relative_to(save / "enhanced").parts[0] == "100"
    capsys.readouterr()
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--eval"])
    out = capsys.readouterr().out
    assert re.search(r"\[test\] EER [\d.]+, minDCF\(0.05\) [\d.]+", out)
    lines = (save / "result" / "eval_scores_test.txt").read_text().splitlines()
    assert len(lines) == len((data / "lists" / "test_test_list.txt").read_text().splitlines())


def test_generate_writes_kaldi_and_packed_stores_with_the_tree_values(data, tmp_path):
    """gen_format kaldi writes <gen_target_dir>/xvector.scp (+ .ark) keyed by the list's paths, with
    exactly the values of the tree of .npy files; packed writes <gen_target_dir>.store, which holds
    them as every store does: L2-normalised rows (as read from the tree) and their norms."""
    import kaldiio

    from stores.keys import store_key
    from stores.open import open_store

    cfg = config(
        data,
        tmp_path,
        trainfunc="CS",
        gen_list=str(data / "lists" / "libri_normal_list.txt"),
        gen_path=str(data / "libri"),
    )
    save = tmp_path / "exp"
    train(cfg, save, "--max_epoch", "1")
    for kind in ("tree", "kaldi", "packed"):
        m_trainer.main(
            [
                "--config",
                str(cfg),
                "--save_path",
                str(save),
                "--generate",
                "--gen_format",
                kind,
                "--gen_target_dir",
                f"enhanced_{kind}",
            ]
        )
    tree = {
        store_key(path.relative_to(save / "enhanced_tree").as_posix()): np.load(path)[0]
        for path in (save / "enhanced_tree").rglob("*.npy")
    }
    scp = dict(kaldiio.load_scp(str(save / "enhanced_kaldi" / "xvector.scp")))
    entries = (data / "lists" / "libri_normal_list.txt").read_text().split()[1::2]
    assert {store_key(key) for key in scp} == tree.keys() == {store_key(rel) for rel in entries}
    store = open_store(save / "enhanced_packed.store")
    packed = dict(zip(store.keys, zip(np.asarray(store.matrix), store.norms(), strict=True), strict=True))
    for key, values in scp.items():
        exact = tree[store_key(key)]
        np.testing.assert_array_equal(values, exact)
        row, norm = packed[store_key(key)]
        np.testing.assert_allclose(norm, np.linalg.norm(exact), rtol=1e-6)
        np.testing.assert_allclose(row, exact / np.linalg.norm(exact), rtol=1e-6, atol=1e-7)
    unknown = "--gen_format: unknown gen_format 'hdf5'; known: kaldi, packed, tree"
    with pytest.raises(UserError, match=unknown):
        m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--generate", "--gen_format", "hdf5"])


def test_check_without_libri_list_gives_a_notice(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="MSE", test_list_libri=None, test_path_libri=None)
    save = tmp_path / "exp"
    run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save), "--max_epoch", "1")
    result = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save), "--check")
    assert "[testset original EER]" in result.stdout
    assert "libriset" not in result.stdout and "skipped" in result.stdout + result.stderr


def test_config_rules(data, tmp_path, monkeypatch):
    cfg = config(data, tmp_path, lr=0.01, model="MyLinearNetv3", mixedprec=False)
    monkeypatch.chdir(tmp_path)
    args = m_trainer.parse_options(["--config", str(cfg), "--lr", "0.5"])
    assert args.lr == 0.5 and args.model == "MyLinearNetv3" and args.batch_size == 32
    assert args.save_path == str(Path("exp_emb") / "exp") and args.mixedprec is False
    assert m_trainer.parse_options([]).model == "MyLinearNetv2"

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown option 'learning_rate'"):
        m_trainer.parse_options(["--config", str(bad)])
    bad.write_text("lr_decya: 0.1\n")
    with pytest.raises(UserError, match="did you mean lr_decay"):
        m_trainer.parse_options(["--config", str(bad)])
    bad.write_text("batch_size: many\n")
    with pytest.raises(UserError, match=r"bad.yaml: option 'batch_size' must be of type int"):
        m_trainer.parse_options(["--config", str(bad)])
    bad.write_text("distributed: 1\n")
    with pytest.raises(UserError, match="bool"):
        m_trainer.parse_options(["--config", str(bad)])


def test_bounds_and_choices_name_the_config_file_or_the_flag(tmp_path):
    cfg = tmp_path / "bounds.yaml"
    cases = (
        ("batch_size: 0\n", "bounds.yaml:1: option 'batch_size' must be at least 1, found 0"),
        ("nDataLoaderThread: -2\n", "option 'nDataLoaderThread' must be 0 or more"),
        ("port: 70000\n", "option 'port' must be at most 65535, found 70000"),
        ("optimizer: adamm\n", "bounds.yaml:1: optimizer: unknown optimizer 'adamm' (did you mean adam"),
        ("gen_format: hdf5\n", "bounds.yaml:1: gen_format: unknown gen_format 'hdf5'; known: kaldi"),
    )
    for text, message in cases:
        cfg.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            m_trainer.parse_options(["--config", str(cfg)])
    cfg.write_text("batch_size: 0\n")
    assert m_trainer.parse_options(["--config", str(cfg), "--batch_size", "4"]).batch_size == 4  # flag wins
    with pytest.raises(UserError, match="^--max_epoch must be at least 1, found 0$"):
        m_trainer.parse_options(["--max_epoch", "0"])
    with pytest.raises(UserError, match="^--scheduler: unknown scheduler 'step'.*; known: .*steplr"):
        m_trainer.parse_options(["--scheduler", "step"])


def test_every_hyper_parameter_is_an_option():
    """A constructor's parameter that no option sets would keep its default whatever a config says."""
    from models.m_Models import MODELS
    from scoring.backends import BACKENDS

    for cls in (*MODELS.values(), *LOSSES.values(), *BACKENDS.values(), Trainer):
        missing = set(hyper_parameters(cls)) - set(m_trainer.OPTIONS) - {"ctx"}  # ctx: the process group
        assert not missing, f"{cls.__name__}: {missing}"


def test_a_hyper_parameter_without_an_option_is_an_error_and_an_unused_one_is_said(
    tmp_path, monkeypatch, caplog
):
    import models.m_Models

    class Widened(models.m_Models.MyLinearNetv2):
        def __init__(self, nOut: int = 512, widht: int = 2):
            super().__init__(nOut)

    monkeypatch.setitem(models.m_Models.MODELS, "Widened", Widened)
    with pytest.raises(UserError, match="Widened takes widht, which no option sets"):
        m_trainer.parse_options(["--model", "Widened"])
    cfg = tmp_path / "unused.yaml"
    cfg.write_text("trainfunc: MSE\nsigma: 0.5\nnClasses: 10\n")
    m_trainer.parse_options(["--config", str(cfg)])
    said = [record.getMessage() for record in caplog.records]
    assert any(str(cfg) in line and "'sigma' is not used" in line for line in said)
    assert any("'nClasses' is not used" in line for line in said)
    caplog.clear()
    m_trainer.parse_options(["--config", str(cfg), "--trainfunc", "DA"])
    assert not any("'sigma'" in record.getMessage() for record in caplog.records)


def test_trainer_options_reach_the_trainer_by_name(data, tmp_path):
    cfg = config(data, tmp_path, optimizer="sgd", lr=0.25, weight_decay=0.5, scheduler="none")
    args = m_trainer.parse_options(["--config", str(cfg), "--save_path", str(tmp_path / "exp")])
    trainer = m_trainer.Run(args, m_utils.SINGLE).trainer
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.25, 0.5, 0.9)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.LambdaLR)


def test_missing_data_says_which_script_makes_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"train_list: {tmp_path}/none_normal_list.txt\ntrain_path: {tmp_path}\n"
        f"test_list: {tmp_path}/none_test.txt\ntest_path: {tmp_path}\n"
    )
    result = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(tmp_path / "x"), check=False)
    assert result.returncode == 2
    assert "none_test.txt does not exist (m_gen_list.py makes it)" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# Restarts: each epoch logged once; a save_path trained with other data or settings is not
# silently trained further


def test_a_run_stopped_before_its_first_checkpoint_logs_each_epoch_once(data, tmp_path):
    """Stopped hard (fault_point) in epoch 3 of 4, before the first checkpoint (test_interval 4),
    epochs 1 and 2 logged: the re-run's scores.txt equals an uninterrupted run's."""
    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=4, test_interval=4)
    save = tmp_path / "exp"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_VARIABLE, "exit_after:trainer.epoch:3")
        stopped = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save), check=False)
    assert stopped.returncode == FAULT_EXIT_STATUS, stopped.stderr
    assert not checkpoints(save / "model")
    logged = (save / "result" / "scores.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in logged] == ["Epoch 1", "Epoch 2"]
    assert train(cfg, save) == train(cfg, tmp_path / "whole")


def test_other_training_data_is_refused_unless_restart_says_what_to_do(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=1)
    save = tmp_path / "exp"
    first = train(cfg, save)
    weights = (save / "model" / "model000000001.model").read_bytes()
    other_list = tmp_path / "other_train.txt"
    lines = (data / "lists" / "train_normal_list.txt").read_text().splitlines()
    other_list.write_text("\n".join(lines[::2]) + "\n")
    with pytest.raises(UserError) as refused:
        train(cfg, save, "--train_list", str(other_list), "--lr", "0.01")
    message = str(refused.value)
    assert message.startswith(
        f"{save / 'model' / 'training.json'}: {save} was trained with other data or settings: train_list "
    )
    assert f"(this run: '{other_list}')" in message and "lr 0.001 (this run: 0.01)" in message
    assert "train_list content (sha256)" in message and "--restart resume" in message
    assert (save / "model" / "model000000001.model").read_bytes() == weights
    assert (save / "result" / "scores.txt").read_text().splitlines() == first
    # The same data and settings, trained further: no question asked.
    assert len(train(cfg, save, "--max_epoch", "2")) == len(first) + 2


def test_restart_resume_goes_on_and_restart_new_moves_the_old_run_aside(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=1)
    save = tmp_path / "exp"
    first = train(cfg, save)
    weights = (save / "model" / "model000000001.model").read_bytes()
    resumed = train(cfg, save, "--lr", "0.01", "--max_epoch", "2", "--restart", "resume")
    assert resumed[: len(first)] == first and len(resumed) == len(first) + 2
    assert train(cfg, save, "--lr", "0.01", "--max_epoch", "2") == resumed  # recorded: no question now
    anew = train(cfg, save, "--restart", "new")
    assert anew == train(cfg, tmp_path / "fresh")
    earlier = list((save / "earlier").iterdir())
    assert len(earlier) == 1
    assert (earlier[0] / "model" / "model000000001.model").read_bytes() == weights
    assert (earlier[0] / "result" / "scores.txt").read_text().splitlines() == resumed
    with pytest.raises(UserError, match="unknown restart 'again'"):
        train(cfg, save, "--restart", "again")
