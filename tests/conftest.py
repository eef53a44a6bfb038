import os
import signal
import threading

import pytest

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS

# The fixtures (tests/e2e/conftest.py) that build network namespaces, and the test files that use them or build their
# own: each builds its subnet's blackhole route in the root namespace, so two of them must not run at once under
# pytest-xdist. pytest-xdist's scheduler sees only node ids, so it groups by file name (NETNS_MODULES);
# pytest_collection_modifyitems refuses a test that uses one of NETNS_FIXTURES from a file not listed there.
NETNS_FIXTURES = {"cluster", "box"}
NETNS_MODULES = {"test_autotune_hosts.py", "test_checkpoint_restart_hosts.py", "test_cluster_box.py",
                 "test_launch_ssh.py", "test_netns_reap.py"}

# Keep each test process to the cores this machine has; gloo ranks spawned by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The ranks tests start get what `ztune launch` gives a job's ranks (ztune/envvars.py CPU_ALLOCATOR_DEFAULTS).
for _key, _value in CPU_ALLOCATOR_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: pytest-timeout is a test extra
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's limit (pyproject's `timeout`, or a test's `timeout` marker) is what an idle machine
    needs; here it follows the load as tests/helpers/load.py's other limits do: when it trips, it is re-armed
    for as long as the highest load factor seen since the test started says the test may still take. Only the
    signal method (pytest-timeout's default on Linux) is stretched; the thread method keeps the plain limit,
    scaled by the load at the start."""
    import pytest_timeout

    from tests.helpers.load import LoadScaledDeadline

    deadline = LoadScaledDeadline(settings.timeout)
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return pytest_timeout.pytest_timeout_set_timer(item, settings._replace(timeout=deadline.limit_s))

    def handler(signum, frame):
        __tracebackhide__ = True
        if not deadline.expired():  # the load rose since: the limit moved out
            signal.setitimer(signal.ITIMER_REAL, max(deadline.limit_s - deadline.elapsed_s(), 1.0))
            return
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return
        terminal = item.config.get_terminal_writer()  # every thread's stack, as pytest-timeout prints it
        terminal.sep("+", title="Timeout")
        pytest_timeout.dump_stacks(terminal)
        terminal.sep("+", title="Timeout")
        pytest.fail(f"Timeout from pytest-timeout: {deadline.explain('the test')}")

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, deadline.limit_s)
    return True


def xdist_group(nodeid: str) -> str:
    """The pytest-xdist group of a test: its file, or "netns" for the files in NETNS_MODULES."""
    path = nodeid.split("::", 1)[0]
    return "netns" if path.rsplit("/", 1)[-1] in NETNS_MODULES else path


def _start_rank(nodeid: str) -> int:
    """Which groups the workers get first: the namespace group, then the other end-to-end tests (each starts whole
    CLIs, trial groups or hosts: the single groups that take longest), then the multi-process tests, then the rest.
    Started last, one of the long groups ran alone for the suite's last minutes (2026-12-07: tests/e2e/
    test_autotune.py took 419 s of the 1,148 s)."""
    if xdist_group(nodeid) == "netns":
        return 0
    parts = nodeid.split("::", 1)[0].split("/")
    return {"e2e": 1, "dist": 2}.get(parts[1] if len(parts) > 2 else "", 3)


@pytest.hookimpl(optionalhook=True)  # optional: pytest-xdist is a test extra
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite on pytest-xdist workers with `--dist loadgroup`: here that means one group per
    test file, so a module-scoped fixture (a training run many tests read) runs once, on one worker, and one
    group "netns" (NETNS_MODULES), so the tests that build network namespaces run one at a time.

    pytest-xdist 3.8's own loadgroup puts a test's `xdist_group` mark into its node id, which pytest 9 no longer
    lets a plugin change: there it falls back to one test at a time, on any worker (2026-12-07: the namespace
    tests ran on three workers at once, and test_parity.py's module fixtures ran once per worker). This scheduler
    takes the group from the node id itself, and hands the groups out in collection order
    (pytest_collection_modifyitems), not xdist's default of the groups with the most tests first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False
    return FileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """Put the tests in the order their groups should start (_start_rank; a stable sort, so each file's tests keep
    their order), and refuse a test that builds network namespaces from a file outside NETNS_MODULES."""
    for item in items:
        if NETNS_FIXTURES & set(getattr(item, "fixturenames", ())) and item.path.name not in NETNS_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(NETNS_FIXTURES & set(item.fixturenames))}: add "
                                    f"{item.path.name} to NETNS_MODULES in tests/conftest.py")
    items.sort(key=lambda item: _start_rank(item.nodeid))
