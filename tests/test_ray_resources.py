"""Precompute asks Ray for declared resources: on a 2-node cluster on loopback (token auth on), the
encoder actors land only on the node that declares the custom resource, however many CPUs the other has."""
import pytest

from dataprep.precompute import PrecomputeConfig, actor_request, precompute
from dataprep.units import finished_units
from microdit.manifest import Manifest
from microdit.ray_cluster import loopback_cluster, ray_session
from test_dataprep_precompute import shapes_converted


def test_actor_request_comes_from_the_config_not_the_cluster():
    cfg = PrecomputeConfig("in", "out", workers=8, min_workers=2, gpus_per_worker=1, address="auto")
    assert actor_request(cfg, todo_units=100) == {"min_size": 2, "max_size": 8, "num_gpus": 1, "num_cpus": 1,
                                                  "resources": {}}
    cfg = PrecomputeConfig("in", "out", workers=4, gpus_per_worker=0, resources={"latent_encoder": 1}, threads=2)
    ask = actor_request(cfg, todo_units=3)                      # never more actors than units
    assert (ask["max_size"], ask["num_gpus"], ask["num_cpus"], ask["resources"]) == (3, 0, 2, {"latent_encoder": 1})


@pytest.mark.slow
def test_actors_land_on_the_node_that_declares_the_resource(tmp_path):
    import ray
    conv = shapes_converted(tmp_path, 80)
    nodes = [{"num_cpus": 3}, {"num_cpus": 2, "resources": {"latent_encoder": 2}}]
    with loopback_cluster(nodes) as address:
        with ray_session(address):
            ids = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        encoder_nodes = {i for i, r in ids.items() if r.get("latent_encoder")}
        assert len(ids) == 2 and len(encoder_nodes) == 1
        cfg = PrecomputeConfig(str(conv), str(tmp_path / "lat"), resolutions=(16,), image_autoencoder="pixel:2",
                               text_encoder="tiny-clip:16", engine="ray", address=address, workers=3, min_workers=1,
                               gpus_per_worker=0, resources={"latent_encoder": 1}, threads=1, unit_samples=10,
                               batch_size=10, progress=False)
        out = precompute(cfg)
    units = finished_units(out)
    assert len(units) == 8 and Manifest.read(out).samples == 80
    ran_on = {u["node"] for u in units.values()}
    assert ran_on == encoder_nodes                               # only where latent_encoder is declared
    assert 1 <= len({u["pid"] for u in units.values()}) <= 2     # at most 2 actors: the node declares 2
