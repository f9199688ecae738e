"""Shared tiny fixtures (keep minimal)."""
import pytest


@pytest.fixture(scope="session")
def flywire_circuit(tmp_path_factory):
    """The bundled FlyWire v783 circuit with all fast layers (ORN, PN, KC, APL, MBON, DN)."""
    from connectome.fetch_data import FlyWireConnectome

    fetcher = FlyWireConnectome(cache_dir=tmp_path_factory.mktemp("dmn_cache"))
    return fetcher.fetch_olfactory_circuit(include_layers=["ORN", "PN", "KC", "APL", "MBON", "DN"])
