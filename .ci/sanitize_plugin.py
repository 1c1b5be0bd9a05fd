"""pytest plugin of .ci/sanitize: the run fails unless the tests really ran the sanitized build.

A test session that silently imported the normal extensions (or none) would pass
without checking anything, so at the end every ``sparsekern._C_*`` module loaded
must come from $SANITIZE_LIB, and all three must have been loaded.
"""
import os
import sys

EXPECTED = ("sparsekern._C_bsr", "sparsekern._C_lowrank", "sparsekern._C_semi")


def pytest_sessionfinish(session, exitstatus):
    lib = os.path.realpath(os.environ["SANITIZE_LIB"]) + os.sep
    loaded = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
              if name.startswith("sparsekern._C_")}
    problems = [f"{name} was never loaded" for name in EXPECTED if name not in loaded]
    problems += [f"{name} came from {path}, not {lib}" for name, path in sorted(loaded.items())
                 if not path or not os.path.realpath(path).startswith(lib)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for name, path in sorted(loaded.items()):
        reporter.write_line(f"sanitize: {name} loaded from {path}")
    if problems:
        for problem in problems:
            reporter.write_line(f"sanitize: {problem}", red=True)
        session.exitstatus = 1
