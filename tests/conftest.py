import os
import signal
import threading

import pytest

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS

# The fixtures (tests/e2e/conftest.py) and modules that build network namespaces: each builds its subnet's
# blackhole route in the root namespace, so two of them must not run at once under pytest-xdist.
NETNS_FIXTURES = {"cluster", "box"}
NETNS_MODULES = {"test_cluster_box.py", "test_netns_reap.py"}

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's --dist loadgroup reads the marks
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on pytest-xdist workers with `--dist loadgroup`. Each test file is one group,
    so a module-scoped fixture (a training run many tests read) runs once, on one worker; every test that
    builds network namespaces joins the one group "netns", so those run one at a time."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        netns = NETNS_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in NETNS_MODULES
        group = "netns" if netns else item.path.relative_to(config.rootpath).as_posix()
        item.add_marker(pytest.mark.xdist_group(group))
