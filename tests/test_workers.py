"""The suite on two pytest-xdist workers (the README's command): tests of one `xdist_group` share a
worker, so the sandbox tests, which count the machine's sandbox processes and share the sandbox
user's process limit, never run beside each other. pytest 9.2 stopped reading the node id xdist 3.8
rewrites for that; conftest.py writes it the way pytest now reads it."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFTEST = textwrap.dedent(f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("suite_conftest", {os.path.join(ROOT, "tests", "conftest.py")!r})
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    globals().update({{k: v for k, v in vars(suite).items() if k.startswith("pytest_")}})
""")

TESTS = textwrap.dedent("""
    import os, time, pytest

    @pytest.mark.xdist_group("together")
    @pytest.mark.parametrize("i", range(6))
    def test_grouped(i):
        time.sleep(0.1)
        print("RAN", "grouped", os.environ["PYTEST_XDIST_WORKER"])

    @pytest.mark.parametrize("i", range(6))
    def test_free(i):
        time.sleep(0.1)
""")


def test_a_group_runs_on_one_worker_with_n_2_alone(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_groups.py").write_text(TESTS)
    env = {**os.environ, "GRPO_JAX_TEST_XLA_CACHE": "off"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    grouped = [line.split()[0] for line in r.stdout.splitlines() if "PASSED" in line and "test_grouped" in line]
    assert len(grouped) == 6 and len(set(grouped)) == 1, r.stdout[-3000:]
    assert all(line.rstrip().endswith("@together") for line in r.stdout.splitlines()
               if "PASSED" in line and "test_grouped" in line)
