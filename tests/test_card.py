"""Self-describing checkpoints: every saved folder carries crossrank.json and a model card, and re-rankers
(infer.py, the PyTerrier transformer) use its settings unless told otherwise, naming a conflict in one line;
and a first load says in one line that a new head was initialised."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_tiny_collection
from crossrank import config
from crossrank.config import ROOT, EvalConfig, load_run_config
from crossrank.errors import CrossrankError
from crossrank.inference import pipeline
from crossrank.models import card
from crossrank.models.loading import load_model
from crossrank.training.loop import train
from test_inference import collection  # noqa: F401  (the toy collection to re-rank: passages of up to 60 words)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def short_model(tiny_bert, tmp_path_factory) -> Path:
    """A mono checkpoint trained (4 steps) at model.max_length=64, not the default 256."""
    out = tmp_path_factory.mktemp("short")
    data = write_tiny_collection(out / "data", valid_is_train=True)
    cfg = load_run_config([ROOT / "configs" / "objectives" / "CL.yaml"], [
        f"model.path={tiny_bert}", "model.name=tiny", f"data.train={data['CL']}", f"train.models_dir={out}",
        "model.max_length=64", "data.num_negatives=3", "data.depth=14", "optim.lr=3e-3", "train.seed=7",
        "train.queries_per_batch=2", "train.accumulation=1", "train.max_steps=4", "train.eval_every=2"])
    train(cfg)
    return out / "tiny.CL.f1.lr0.003.s7"


@pytest.fixture
def toy_dataset(collection, tmp_path, monkeypatch) -> Path:  # noqa: F811
    dataset = tmp_path / "toy.yaml"
    dataset.write_text(f"name: toy\ncorpus: {collection['corpus.tsv']}\ntopics: {collection['topics.tsv']}\n"
                       f"qrels: {collection['qrels.txt']}\nruns: {{bm25: {collection['run.txt']}}}\nrel_level: 2\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)  # runs/ go there
    return dataset


def infer(model: Path, dataset: Path, *overrides: str) -> tuple[str, dict]:
    """infer.py's work with these overrides: the run file's text and the config recorded with it."""
    cfg = load_run_config(overrides=[f"eval.dataset={dataset}", "eval.block_queries=2", "eval.precision=fp32",
                                     *overrides])
    pipeline.run_inference(cfg, str(model))
    out = config.ROOT / "runs" / f"toy.bm25.{model.parent.name}"
    import yaml

    return Path(f"{out}.run").read_text(), yaml.safe_load(Path(f"{out}.yaml").read_text())


def test_every_saved_folder_describes_itself_and_has_a_card(short_model):
    for folder in (short_model / "model", short_model / "checkpoint"):
        settings = json.loads((folder / "crossrank.json").read_text())
        assert settings["kind"] == "mono" and settings["max_length"] == 64 and settings["truncation"] == "pair"
        assert (settings["query_length"], settings["passage_length"], settings["depth"]) == (32, 256, None)
        recipe = settings["recipe"]
        assert recipe["objectives"] == ["CL"] and recipe["lr"] == 0.003 and recipe["seed"] == 7
        assert recipe["loss"] == "lce" and recipe["stage"] == 1
        assert settings["validation"]["metric"] == "nDCG@10"
        readme = (folder / "README.md").read_text()
        assert "objectives CL" in readme and "lr 0.003" in readme and "seed 7" in readme
        assert "CrossEncoder(" in readme and "max_length=64" in readme and "CrossEncoderReranker" in readme
    model = json.loads((short_model / "model" / "crossrank.json").read_text())
    selected = json.loads((short_model / "model" / "selected.json").read_text())
    assert model["recipe"]["steps"] == selected["step"] == model["validation"]["step"]
    assert model["validation"]["value"] == selected["value"] and "(these weights)" in \
        (short_model / "model" / "README.md").read_text()
    assert json.loads((short_model / "checkpoint" / "crossrank.json").read_text())["recipe"]["steps"] == 4


def test_infer_uses_the_checkpoints_max_length_and_names_a_conflict(short_model, toy_dataset, capsys):
    plain, plain_cfg = infer(short_model / "model", toy_dataset)
    assert plain_cfg["model"]["max_length"] == 64  # the checkpoint's, not configs/defaults.yaml's 256
    explicit, _ = infer(short_model / "model", toy_dataset, "model.max_length=64")
    assert explicit == plain
    assert "overrides the checkpoint" not in capsys.readouterr().err
    # an explicit other value is used, and said in one line; the toy passages are longer than 64 tokens,
    # so it scores otherwise
    longer, longer_cfg = infer(short_model / "model", toy_dataset, "model.max_length=256")
    err = capsys.readouterr().err
    assert "note: model.max_length=256 overrides the checkpoint's 64\n" in err
    assert err.count("overrides the checkpoint") == 1
    assert longer_cfg["model"]["max_length"] == 256 and longer != plain


def test_pyterrier_transformer_uses_the_checkpoints_settings(short_model, toy_dataset, collection):  # noqa: F811
    import pandas as pd

    from crossrank.data.runs import load_run
    from crossrank.data.texts import read_corpus, read_topics
    from crossrank.inference.pyterrier import CrossEncoderReranker

    run_text, _ = infer(short_model / "model", toy_dataset)
    reranker = CrossEncoderReranker(short_model / "model", eval_cfg=EvalConfig(block_queries=2, precision="fp32"),
                                    device="cpu")
    assert reranker.model_config.max_length == 64
    topics, texts = read_topics(collection["topics.tsv"]), dict(read_corpus(collection["corpus.tsv"]))
    first = load_run(collection["run.txt"], depth=100)
    frame = pd.DataFrame([(q, topics[q], d, texts[d], s) for q, r in first.items() for d, s in r],
                         columns=["qid", "query", "docno", "text", "score"])
    result = reranker.transform(frame)
    expected = sorted((line.split()[0], line.split()[2], float(line.split()[4])) for line in run_text.splitlines())
    got = sorted((q, d, round(s, 6)) for q, d, s in result[["qid", "docno", "score"]].itertuples(index=False))
    assert got == expected


def test_set_encoder_checkpoint_reranks_without_its_kind(tiny_bert, toy_dataset, tmp_path, capsys):
    data = write_tiny_collection(tmp_path / "data", valid_is_train=True)
    files = [ROOT / "configs" / "backbones" / "set-encoder.yaml", ROOT / "configs" / "objectives" / "CL.yaml",
             ROOT / "configs" / "set-encoder" / "CL.yaml"]
    cfg = load_run_config(files, [f"model.path={tiny_bert}", "model.name=tiny-se", f"data.train={data['CL']}",
                                  f"train.models_dir={tmp_path / 'models'}", "model.passage_length=48",
                                  "data.depth=14", "optim.lr=1e-3", "train.queries_per_batch=2",
                                  "train.accumulation=1", "train.max_steps=2", "train.eval_every=2"])
    train(cfg)
    folder = next((tmp_path / "models").glob("tiny-se.*")) / "model"
    settings = json.loads((folder / "crossrank.json").read_text())
    assert (settings["kind"], settings["truncation"], settings["passage_length"]) == ("set-encoder", "per_field", 48)
    assert settings["depth"] == 100 and "Not loadable as a sentence-transformers" in (folder / "README.md").read_text()
    plain, plain_cfg = infer(folder, toy_dataset)  # no -c set-encoder, no model.kind
    assert plain_cfg["model"]["kind"] == "set-encoder" and plain_cfg["model"]["passage_length"] == 48
    explicit, _ = infer(folder, toy_dataset, "model.kind=set-encoder", "model.truncation=per_field")
    assert explicit == plain
    # what the wrapper's -c set-encoder stacks: configs/backbones/set-encoder.yaml does not count as a choice
    stacked = load_run_config([ROOT / "configs" / "backbones" / "set-encoder.yaml"], [f"eval.dataset={toy_dataset}"])
    assert card.explicit_keys(stacked) == set()
    with pytest.raises(CrossrankError, match="is a set-encoder checkpoint, loaded as model.kind=mono"):
        load_model(folder, explicit={"kind"})


def test_older_folders_without_crossrank_json_read_their_yaml(short_model, tmp_path):
    import shutil

    old = shutil.copytree(short_model / "model", tmp_path / "old")
    (old / "crossrank.json").unlink()
    (old / "crossrank.manifest").unlink()  # folders saved before either file existed had neither
    assert card.read_settings(old)["max_length"] == 64
    model, tokenizer = load_model(old)
    assert tokenizer.model.max_length == 64


def test_a_new_head_is_announced_in_one_line(tiny_bert, tmp_path, capfd):
    from transformers import AutoModel

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_bert).save_pretrained(bare)  # the encoder without its classification head
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).is_file():
            shutil_copy(tiny_bert / name, bare / name)
    capfd.readouterr()
    load_model(bare)
    err = capfd.readouterr().err
    assert err == f"note: new classification head (1 logit) initialised for {bare}\n"
    load_model(tiny_bert)  # a trained head: nothing to say
    assert capfd.readouterr().err == ""


def shutil_copy(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())
