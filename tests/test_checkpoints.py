"""Checkpoints a user already has (the original repository's, voxceleb_trainer's in all three formats)
and the original's behaviour where it was right: --check before training, Vacc -1, validation on
speakers without a class."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config, make_embedding_tree, random_checkpoint, reference_keys, train

import m_trainer
from m_comb_embs import combine
from m_DataLoader import EmbeddingData, Sampling, TrialSet
from m_gen_list import make_lists
from m_network import SpeakerNet, Trainer, parse_score_line
from m_utils import UserError
from models import ResNetSE34V2
from models.m_Extractors import load_extractor
from scoring.metrics import compute_eer

DIM = 24
# The original's MyLinearNet/v2 widths (l1..l5) and v3 (l1..l3), in multiples of nOut.
WIDTHS = {"MyLinearNetv2": (2, 4, 4, 2, 1), "MyLinearNetv3": (2, 2, 1)}


def original_checkpoint(
    path: Path, model: str = "MyLinearNetv2", dim: int = DIM, classes: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A bare state dict with the original's names, as its trainer saved model/model%09d.model."""
    generator = torch.Generator().manual_seed(seed)
    state, size = {}, dim
    for number, width in enumerate(WIDTHS[model], start=1):
        state[f"__S__.l{number}.weight"] = torch.randn(width * dim, size, generator=generator) / size**0.5
        state[f"__S__.l{number}.bias"] = torch.randn(width * dim, generator=generator) * 0.1
        size = width * dim
    if classes:
        state["__L__.softmax.fc.weight"] = torch.randn(classes, dim, generator=generator)
        state["__L__.softmax.fc.bias"] = torch.randn(classes, generator=generator)
    torch.save(state, path)
    return state


def direct_mlp(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The original's MLP computed by hand: ReLU after every layer, the last one too."""
    out = torch.from_numpy(x).double()
    for number in range(1, len(state) // 2 + 1):
        if f"__S__.l{number}.weight" not in state:
            break
        weight, bias = state[f"__S__.l{number}.weight"].double(), state[f"__S__.l{number}.bias"].double()
        out = torch.relu(out @ weight.T + bias)
    return out.numpy()


def printed_eers(output: str) -> dict[str, tuple[float, float]]:
    return {
        name: (float(original), float(processed))
        for name, original, processed in re.findall(
            r"\[(\w+) original EER\] ([\d.]+), \[\w+ processed EER\] ([\d.]+)", output
        )
    }


# ----------------------------------------------------------------------------------------------
# The original repository's enhancement checkpoints


def test_check_with_an_original_checkpoint_equals_the_direct_mlp(data, tmp_path, capsys):
    path = tmp_path / "model000000020.model"
    state = original_checkpoint(path)
    cfg = config(data, tmp_path, trainfunc="MSE", model="MyLinearNetv2")
    m_trainer.main(
        ["--config", str(cfg), "--save_path", str(tmp_path / "exp"), "--check", "--initial_model", str(path)]
    )
    found = printed_eers(capsys.readouterr().out)
    for name, folder in (("testset", "test"), ("libriset", "libri")):
        trials = TrialSet(data / "lists" / f"{folder}_test_list.txt", data / folder, DIM)
        enhanced = direct_mlp(state, trials.embeddings)
        # MSE scores type B by the L2 distance of the outputs as they are (not normalised)
        direct = -np.linalg.norm(enhanced[trials.left] - enhanced[trials.right], axis=1)
        saved = np.load(tmp_path / "exp" / "result" / f"trials_{folder}.npz")["processed"]
        np.testing.assert_allclose(saved, direct, rtol=1e-4, atol=1e-5)
        assert found[name][1] == round(compute_eer(saved, trials.labels)[0], 4)
        assert abs(found[name][1] - compute_eer(direct, trials.labels)[0]) < 0.2
        assert found[name][1] != found[name][0]


def test_generate_and_eval_with_an_original_checkpoint(data, tmp_path, capsys):
    path = tmp_path / "model000000005.model"
    state = original_checkpoint(path, seed=3)
    cfg = config(
        data,
        tmp_path,
        trainfunc="MSE",
        gen_list=str(data / "lists" / "libri_normal_list.txt"),
        gen_path=str(data / "libri"),
    )
    save = tmp_path / "exp"
    m_trainer.main(
        ["--config", str(cfg), "--save_path", str(save), "--generate", "--initial_model", str(path)]
    )
    rel = (data / "lists" / "libri_normal_list.txt").read_text().split()[1]
    written = np.load((save / "enhanced" / rel).with_suffix(".npy"))
    trials = TrialSet(data / "lists" / "libri_test_list.txt", data / "libri", DIM)
    expected = direct_mlp(state, trials.embeddings[[trials.files.index(rel)]])
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-5)
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--eval", "--initial_model", str(path)])
    assert "[test] EER" in capsys.readouterr().out


def test_original_softmax_checkpoint_fills_the_classifier_and_starts_training(data, tmp_path):
    path = tmp_path / "original.model"
    state = original_checkpoint(path, classes=40)
    cfg = config(data, tmp_path, trainfunc="MSE_Softmax", nClasses=40, max_epoch=1, lr=0.0)
    save = tmp_path / "exp"
    train(cfg, save, "--initial_model", str(path))
    network = torch.load(save / "model" / "model000000001.model", weights_only=True)["network"]
    linear = [key for key in network if key.startswith("model.") and key.endswith(".weight")]
    assert len(linear) == 5
    for number, key in enumerate(linear, start=1):  # lr 0: the weights are the checkpoint's
        assert torch.equal(network[key], state[f"__S__.l{number}.weight"]), key
    assert torch.equal(network["loss.fc.weight"], state["__L__.softmax.fc.weight"])
    assert torch.equal(network["loss.fc.bias"], state["__L__.softmax.fc.bias"])


def test_an_original_run_folder_resumes_after_its_last_checkpoint(data, tmp_path):
    save = tmp_path / "exp"
    (save / "model").mkdir(parents=True)
    original_checkpoint(save / "model" / "model000000002.model")
    lines = train(config(data, tmp_path, trainfunc="MSE", max_epoch=3), save)
    assert [parse_score_line(line)[1]["Epoch"] for line in lines] == [3, 3]


@pytest.mark.parametrize(
    "model, dim, message",
    [
        ("MyLinearNetv2", 32, "'__S__.l1.weight' has shape (64, 32), MyLinearNetv2 (nOut 24) needs (48, 24)"),
        ("MyLinearNetv3", DIM, "linear layers l1, l2, l3; MyLinearNetv2 has 5"),
    ],
)
def test_an_original_checkpoint_that_does_not_fit_names_key_shapes_and_model(
    data, tmp_path, model, dim, message
):
    path = tmp_path / "original.model"
    original_checkpoint(path, model=model, dim=dim)
    cfg = config(data, tmp_path, trainfunc="MSE", model="MyLinearNetv2")
    with pytest.raises(UserError) as error:
        m_trainer.main(
            [
                "--config",
                str(cfg),
                "--save_path",
                str(tmp_path / "exp"),
                "--check",
                "--initial_model",
                str(path),
            ]
        )
    assert "original.model" in str(error.value) and message in str(error.value)


# ----------------------------------------------------------------------------------------------
# voxceleb_trainer's extractor checkpoints, all three formats


@pytest.mark.parametrize("form", ["bare", "model_state_dict", "legacy"])
def test_every_voxceleb_trainer_format_loads_the_same_weights(tmp_path, caplog, form):
    bare = random_checkpoint(reference_keys())
    bare["__L__.softmax.fc.weight"] = torch.zeros(4, 512)
    if form == "model_state_dict":
        stored = {
            "model_state_dict": bare,
            "optimizer_state_dict": {"state": {}},
            "scheduler_state_dict": {"last_epoch": 3},
            "epoch": 3,
        }
    elif form == "legacy":
        stored = {"model": {key.removeprefix("__S__."): value for key, value in bare.items()}}
    else:
        stored = bare
    path = tmp_path / f"{form}.model"
    torch.save(stored, path)
    with caplog.at_level(logging.INFO):
        model = load_extractor("ResNetSE34V2", path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, bare["__S__." + name]), name
    unused = ["__L__.*"] + (
        ["epoch", "optimizer_state_dict", "scheduler_state_dict"] if form == "model_state_dict" else []
    )
    assert ResNetSE34V2.select_weights(torch.load(path, weights_only=True))[1] == unused
    said = [record.getMessage() for record in caplog.records if "not used" in record.getMessage()]
    assert said == [f"{path}: loading the ResNetSE34V2 weights; not used: {', '.join(unused)}"]


# ----------------------------------------------------------------------------------------------
# The original's behaviour


def test_check_before_training_prints_the_original_eer(data, tmp_path, capsys, caplog):
    cfg = config(data, tmp_path, trainfunc="MSE")
    with caplog.at_level(logging.INFO):
        m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / "exp"), "--check"])
    out = capsys.readouterr().out
    for label, folder, listed in (
        ("testset", "test", "test_test_list.txt"),
        ("libriset", "libri", "libri_test_list.txt"),
    ):
        line = re.search(rf"\[{label} original EER\] ([\d.]+), \[{label} original minDCF\] ([\d.]+)", out)
        trials = TrialSet(data / "lists" / listed, data / folder, DIM)
        scores = -np.linalg.norm(trials.embeddings[trials.left] - trials.embeddings[trials.right], axis=1)
        assert float(line.group(1)) == pytest.approx(compute_eer(scores, trials.labels)[0], abs=1e-3)
    assert "processed" not in out
    assert any("enhanced EER needs a model" in record.getMessage() for record in caplog.records)


def unseen_speakers(tmp_path: Path) -> Path:
    """An embedding tree of speakers the training list does not have, with their speaker files."""
    root = make_embedding_tree(tmp_path / "unseen", speakers=4, prefix="zz", dim=DIM, seed=7)
    combine(root)
    make_lists(root, "unseen", tmp_path / "lists", seed=1, kinds=("normal",))
    return root


def mse_softmax_trainer(classes: int = 40) -> Trainer:
    torch.manual_seed(0)
    net = SpeakerNet("MyLinearNetv2", "MSE_Softmax", nOut=DIM, nClasses=classes)
    return Trainer(net, torch.device("cpu"))


def test_validation_on_speakers_without_a_class_is_not_made_up(data, tmp_path):
    lists = data / "lists"
    root = unseen_speakers(tmp_path)
    train_data = EmbeddingData(lists / "train_normal_list.txt", data / "train", "normal", "B", DIM)
    unseen = EmbeddingData(
        tmp_path / "lists" / "unseen_normal_list.txt", root, "normal", "B", DIM, speakers=train_data.speakers
    )
    assert (unseen.records.labels == -1).all()
    trainer = mse_softmax_trainer()
    result = trainer.validate(unseen, Sampling(batch_size=32, seed=1))
    with torch.no_grad():
        out = trainer.net.model(unseen.embeddings[unseen.records.inputs])
        mse = torch.nn.functional.mse_loss(out, unseen.speaker_embeddings[unseen.records.targets]).item()
    assert result.loss == pytest.approx(mse, rel=1e-5)  # the MSE part alone
    assert np.isnan(result.accuracy) and result.left_out == ["cross-entropy"]
    softmax = Trainer(SpeakerNet("MyLinearNetv2", "Softmax", nOut=DIM, nClasses=40), torch.device("cpu"))
    nothing = softmax.validate(unseen, Sampling(batch_size=32, seed=1))
    assert np.isnan(nothing.loss) and np.isnan(nothing.accuracy)


def test_validation_classifier_term_counts_only_speakers_with_a_class(data, tmp_path):
    lists = data / "lists"
    root = unseen_speakers(tmp_path)
    known = (lists / "train_normal_list.txt").read_text().splitlines()[0]
    speaker = known.split()[0]
    for item in (speaker, f"{speaker}.npy", f"{speaker}_type2.npy"):
        (root / item).symlink_to(data / "train" / item)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(
        known
        + "\n"
        + "".join(
            line + "\n"
            for line in (tmp_path / "lists" / "unseen_normal_list.txt").read_text().splitlines()[:5]
        )
    )
    train_data = EmbeddingData(lists / "train_normal_list.txt", data / "train", "normal", "B", DIM)
    valid = EmbeddingData(mixed, root, "normal", "B", DIM, speakers=train_data.speakers)
    trainer = mse_softmax_trainer()
    result = trainer.validate(valid, Sampling(batch_size=4, seed=1))
    with torch.no_grad():
        out = trainer.net.model(valid.embeddings[valid.records.inputs])
        known = torch.from_numpy(valid.records.labels >= 0)
        labels = torch.from_numpy(valid.records.labels)
        entropy = torch.nn.functional.cross_entropy(trainer.net.loss.fc(out[known]), labels[known]).item()
        mse = torch.nn.functional.mse_loss(out, valid.speaker_embeddings[valid.records.targets]).item()
        correct = (trainer.net.loss.fc(out[known]).argmax(1) == labels[known]).double().mean().item() * 100
    assert int(known.sum()) == 1
    assert result.loss == pytest.approx(entropy + mse, rel=1e-5)
    assert result.accuracy == pytest.approx(correct) and result.left_out == []


def test_training_log_says_once_what_validation_left_out(data, tmp_path, caplog):
    root = unseen_speakers(tmp_path)
    cfg = config(
        data,
        tmp_path,
        trainfunc="MSE_Softmax",
        max_epoch=2,
        valid_list=str(tmp_path / "lists" / "unseen_normal_list.txt"),
        valid_path=str(root),
    )
    with caplog.at_level(logging.INFO):
        lines = train(cfg, tmp_path / "exp")
    said = [r.getMessage() for r in caplog.records if "left out of VLoss" in r.getMessage()]
    assert len(said) == 1 and "cross-entropy" in said[0]
    values = [parse_score_line(line)[1] for line in lines if line.startswith("--Val--")]
    assert len(values) == 2 and all(np.isfinite(v["VLoss"]) and np.isnan(v["Vacc"]) for v in values)
