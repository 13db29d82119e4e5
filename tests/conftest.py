"""Shared fixtures, and the test tiers.

``./run_tests.sh`` runs the fast tier: the optimizer, the package's unit tests and every notebook in the smoke
profile. Tests marked ``slow`` (every notebook's real loaders at quick and paper scale, JupyterLab in a browser
and the executed notebooks' outputs, the parallel workers and run_all.sh end to end) run with
``./run_tests.sh --all`` (pytest's ``--all-tiers``), as CI does."""
import pytest

from original_format import write_original_downloads

SLOW_HINT = "./run_tests.sh --all runs them (CI does)"


def pytest_addoption(parser):
    parser.addoption("--all-tiers", action="store_true", default=False,
                     help="also run the tests marked slow (./run_tests.sh --all passes this)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier; runs with --all-tiers (./run_tests.sh --all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all-tiers"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        config._slow_deselected = len(slow)


def pytest_report_header(config):
    if config.getoption("--all-tiers"):
        return "tiers: all (fast and slow)"
    return f"tiers: fast only; the tests marked slow are deselected: {SLOW_HINT}"


def pytest_terminal_summary(terminalreporter, config):
    count = getattr(config, "_slow_deselected", 0)
    if count:
        terminalreporter.write_line(f"fast tier: {count} slow tests not run; {SLOW_HINT}")


@pytest.fixture(scope="session")
def original_format_data(tmp_path_factory):
    """``(data folder, checksums JSON)``: tiny MNIST, Fashion-MNIST, CIFAR-10, IMDb, GloVe 100-d and CelebA files
    as downloaded (tests/original_format.py), and the md5s of those files for ``$LOSSGRAD_CHECKSUMS``."""
    root = tmp_path_factory.mktemp("data")
    return root, write_original_downloads(root)
