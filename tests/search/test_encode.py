"""A corpus encoded shard by shard on Ray: ``ragsweep index`` killed and resumed, and ``launch``
encoding a corpus of many shards before its trials."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from search.launch.dispatch import launch
from search.launch.encode import EncodeProgress
from search.spec import load_spec
from tests.cli import ragsweep
from tests.tiny import TINY_SPEC, tiny_rows
from tests.trainers.test_corpus import _jsonl
from trainers.data import load_corpus
from trainers.encode import encode_corpus, vectors_path
from trainers.models import load_embedder

pytestmark = pytest.mark.slow


def _spec(folder: Path, fillers: int) -> Path:
    """The tiny data set with its corpus as a JSONL file, ``fillers`` passages added to it (the
    count makes the corpus, and so its vectors file, this test's own)."""
    passages, questions = tiny_rows()
    passages += [
        {"id": f"filler-{i}", "title": f"Filler {i}", "text": f"passage {i} about nothing much"}
        for i in range(fillers)
    ]
    data = TINY_SPEC["data"] | {
        "source": "jsonl",
        "path": _jsonl(folder / "questions.jsonl", questions),
        "corpus_path": _jsonl(folder / "corpus.jsonl", passages),
    }
    spec_file = folder / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            TINY_SPEC
            | {
                "name": f"encode-{uuid.uuid4().hex[:8]}",
                "methods": ["ft_embed"],
                "search": {"lr_embedder": [1e-3]},
                "data": data,
            }
        )
    )
    return spec_file


def _vectors(spec_file: Path, cache_dir: Path) -> tuple[Path, np.ndarray]:
    """The vectors file of the spec's corpus, and its vectors encoded here in one process."""
    spec = load_spec(spec_file)
    corpus = load_corpus(spec.data)
    embedder = load_embedder("tiny", cache_dir=cache_dir, device=torch.device("cpu"))
    max_length = spec.training.embedder_max_length
    here = encode_corpus(embedder, corpus, max_length=max_length, batch_size=64, tokens=[])
    return vectors_path(cache_dir, embedder, corpus, max_length), np.concatenate(list(here))


def test_a_killed_index_resumes_without_re_encoding_its_finished_shards(tmp_path, cache_dir):
    spec_file = _spec(tmp_path, fillers=1000)  # 1,150 passages: 115 shards of 10
    vectors_file, encoded_here = _vectors(spec_file, cache_dir)
    shards = vectors_file.with_name(f"{vectors_file.stem}.shards-10")
    command = [sys.executable, "-c", "from search.cli import main; main()", "index"]
    killed = subprocess.Popen(
        [*command, str(spec_file), "--shard-passages", "10", "--workers", "1"],
        env=os.environ | {"RAGSWEEP_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its local Ray goes with it
    )
    deadline = time.monotonic() + 300
    while len(list(shards.glob("*.npy"))) < 3 and killed.poll() is None:
        assert time.monotonic() < deadline, "no shard was written in 5 minutes"
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the encode finished before it could be killed"
    time.sleep(1)  # a shard the worker was renaming into place as the kill came
    finished = sorted(shards.glob("*.npy"))
    assert 3 <= len(finished) < 115 and not vectors_file.exists()
    # A finished shard made recognisable: a resumed encode that re-encoded it would overwrite it.
    first, stop = (int(bound) for bound in finished[0].stem.split("-"))
    marker = np.full((stop - first, encoded_here.shape[1]), 0.25, dtype=np.float32)
    np.save(finished[0], marker)

    resumed = ragsweep(
        "index", str(spec_file), "--shard-passages", "10", env={"RAGSWEEP_CACHE": str(cache_dir)}
    )

    assert resumed.returncode == 0, resumed.stderr
    started = re.search(
        r"encoding 1,150 passages in 115 shards on \d Ray workers, (\d+) already", resumed.stdout
    )
    assert started and int(started.group(1)) == len(finished), resumed.stdout
    doc_vectors = np.load(vectors_file)
    np.testing.assert_array_equal(doc_vectors[first:stop], marker)
    others = np.ones(len(doc_vectors), dtype=bool)
    others[first:stop] = False
    # Shards are encode calls of their own: the same vectors up to float rounding.
    np.testing.assert_allclose(doc_vectors[others], encoded_here[others], rtol=0, atol=1e-5)
    assert not shards.exists()


def test_a_launch_encodes_a_corpus_of_many_shards_on_ray_before_its_trials(
    tmp_path, cache_dir, monkeypatch
):
    spec_file = _spec(tmp_path, fillers=450)  # 600 passages
    vectors_file, encoded_here = _vectors(spec_file, cache_dir)
    monkeypatch.setattr("trainers.encode.SHARD_PASSAGES", 200)
    reports: list[EncodeProgress] = []

    summary = launch(
        load_spec(spec_file),
        storage_url=f"sqlite:///{tmp_path / 'studies.db'}",
        runs_dir=tmp_path / "runs",
        cache_dir=cache_dir,
        on_encode=reports.append,
    )

    assert summary.ran == {"ft_embed": 1} and summary.failed == {"ft_embed": 0}
    assert [(r.shards, r.done_passages) for r in (reports[0], reports[-1])] == [(3, 0), (3, 600)]
    np.testing.assert_allclose(np.load(vectors_file), encoded_here, rtol=0, atol=1e-5)
