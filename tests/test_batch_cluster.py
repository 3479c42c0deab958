"""`fvgpt classify`'s driver on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: two raylets, one
GCS, on 127.0.0.1): the tower actors spread over both nodes, each row says which node's actor produced it, and the
rows are the same as one node gives (the Python API's).

The job's placement group puts one actor on each node. Ray Data gives a decoded block to an actor with room for it (at
most two blocks in flight each), preferring the least busy one and the one on the node holding the block; so work
reaches a second node's actor when the first is busy. On CPU a ViT-B/16 tower takes ~0.8 s per batch of 32 and a
decode task ~0.08 s, so every actor has work queued; the test's tiny tower is as fast as decoding, and one actor alone
kept up with the whole job in some runs. The towers here are the real ones, each batch held 0.25 s longer, as a slow
tower would."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="`fvgpt classify` needs the `batch` extra (Ray Data, pyarrow), which this install "
                                  "lacks: pip install '.[cpu,serve,dev,batch]'")
import fvgpt_runtime as fr
import pyarrow.parquet as pq
from fvgpt_batch import job
from fvgpt_batch.inputs import expand
from fvgpt_batch.job import Settings, run
from fvgpt_batch.shards import JobRecord
from fvgpt_batch.stages import Model, Towers
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.slow


def _slow_towers() -> type:
    class SlowTowers(Towers):  # defined in a function: Ray ships the class itself to the workers, not its module name
        def __call__(self, batch):
            time.sleep(0.25)
            return super().__call__(batch)
    return SlowTowers


def test_two_nodes_share_the_job(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "Towers", _slow_towers())
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(images / f"{i:03d}.png")
    clf = fr.load(tiny_bundle)
    model = Model(clf.name, clf.version, str(Path(tiny_bundle).resolve()), clf.info.model_id, clf.tower_id,
                  clf.choice.runtime, clf.choice.precision, None, 3)
    items = expand([str(images)])
    record = JobRecord(len(items), items.digest(), [{"name": model.name}], None, 3, False, "parquet", 16)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {cluster.head_node.node_id: "head", worker.node_id: "worker"}
        # two actors of half a CPU: the SPREAD placement puts one on each node, and decode tasks fit beside them
        summary = run(items, [model], record, tmp_path / "out",
                      Settings(address=cluster.address, actors=2, actor_cpus=0.5, batch_size=4, progress=False))
    finally:
        cluster.shutdown()
    rows = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).to_pylist()
    by_node = Counter(nodes[r["node_id"]] for r in rows)
    print(f"two-node run: {summary['images']} images, rows per node {dict(by_node)}, {summary['wall_s']:.1f} s")
    assert set(by_node) == {"head", "worker"} and sum(by_node.values()) == 64
    api = clf.classify(sorted(str(p) for p in images.iterdir()), top_k=3)
    for r, a in zip(rows, api, strict=True):
        assert r["labels"] == [p.label for p in a.predictions]
        assert max(abs(x - p.probability) for x, p in zip(r["probabilities"], a.predictions)) <= 1e-6
