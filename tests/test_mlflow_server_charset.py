"""slurm/mlflow-server.sh and the character set of its MySQL/MariaDB database.

MLflow 3.18 pins ``utf8mb4_bin`` on some columns; on a latin1 database (Debian MariaDB's default)
its schema migration fails and the server never comes up. A database the script makes in the test
cluster is utf8mb4; one it made before in latin1 is converted (tables and foreign keys kept); a
given database (TSKD_MLFLOW_DB_URI) in latin1 is refused before any server starts, with the SQL
that fixes it. Each test makes a database of its own in the test cluster's MariaDB and drops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.mlflow_server import free_port
from tests.slurm_fixtures import slurm_cluster  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mlflow-server.sh"
SOCK = Path(os.environ.get("TSKD_SLURM_DIR", "/var/tmp/tskd-slurm")) / "mysql/run/mariadbd.sock"


def _sql(statements: str) -> str:
    """Run SQL as MariaDB's root through the test cluster's socket; return its tab-separated output."""
    r = subprocess.run(["mariadb", "--no-defaults", "--protocol=socket", f"--socket={SOCK}", "-uroot", "-N", "-B"],
                       input=statements, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TSKD_MLFLOW_", "MLFLOW_"))}
    env.update(TSKD_MLFLOW_DIR=str(state), TSKD_MLFLOW_PORT=str(free_port()), TSKD_MLFLOW_PYTHON=sys.executable,
               **extra)
    return env


def _script(cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True, env=env, timeout=600,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def latin1_db(slurm_cluster):  # noqa: F811
    """A latin1 database with two tables joined by a foreign key, as the script made them before."""
    if os.geteuid() != 0:
        pytest.skip("MariaDB's root account of the test cluster is reached as root")
    name = f"tskd_cs_{uuid.uuid4().hex[:8]}"
    _sql(f"CREATE DATABASE `{name}` CHARACTER SET latin1; USE `{name}`;"
         "CREATE TABLE parent (ws VARCHAR(63) NOT NULL, name VARCHAR(200) NOT NULL, PRIMARY KEY (ws, name));"
         "CREATE TABLE child (id INT PRIMARY KEY, ws VARCHAR(63) NOT NULL, name VARCHAR(200) NOT NULL,"
         " CONSTRAINT fk_child_parent FOREIGN KEY (ws, name) REFERENCES parent (ws, name) ON DELETE CASCADE);"
         "INSERT INTO parent VALUES ('default', 'caf\u00e9'); INSERT INTO child VALUES (1, 'default', 'caf\u00e9');")
    yield name
    _sql(f"DROP DATABASE IF EXISTS `{name}`; DROP USER IF EXISTS '{name}'@'127.0.0.1';")


@pytest.mark.slow
def test_a_latin1_database_of_the_test_cluster_is_converted_and_the_server_starts(latin1_db, tmp_path):
    env = _env(tmp_path / "state", TSKD_MLFLOW_DB_NAME=latin1_db)
    try:
        r = _script("start", env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"converting database {latin1_db} to utf8mb4" in r.stderr, r.stderr
    finally:
        _script("stop", env)
    q = f"WHERE TABLE_SCHEMA = '{latin1_db}'"
    assert _sql(f"SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
                f"WHERE SCHEMA_NAME = '{latin1_db}'").split() == ["utf8mb4"]
    assert _sql(f"SELECT TABLE_NAME FROM information_schema.TABLES {q} AND TABLE_COLLATION NOT LIKE 'utf8mb4%'") == ""
    assert "experiments" in _sql(f"SELECT TABLE_NAME FROM information_schema.TABLES {q}").split()  # MLflow's schema
    # The foreign key is back, with its rule, and the data survived the conversion.
    fk = _sql(f"SELECT CONSTRAINT_NAME, DELETE_RULE FROM information_schema.REFERENTIAL_CONSTRAINTS "
              f"WHERE CONSTRAINT_SCHEMA = '{latin1_db}' AND TABLE_NAME = 'child'").split()
    assert fk == ["fk_child_parent", "CASCADE"]
    assert _sql(f"SELECT name FROM `{latin1_db}`.child").strip() == "caf\u00e9"
    # A second start finds nothing to convert.
    try:
        again = _script("start", env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "converting" not in again.stderr
    finally:
        _script("stop", env)


def test_a_given_latin1_database_is_refused_before_any_server_starts(latin1_db, tmp_path):
    pw = uuid.uuid4().hex
    _sql(f"CREATE USER '{latin1_db}'@'127.0.0.1' IDENTIFIED BY '{pw}';"
         f"GRANT ALL PRIVILEGES ON `{latin1_db}`.* TO '{latin1_db}'@'127.0.0.1';")
    cnf = tmp_path / "my.cnf"
    cnf.write_text(f"[client]\nuser = {latin1_db}\npassword = {pw}\n")
    cnf.chmod(0o600)
    port = os.environ.get("TSKD_SLURM_DB_PORT", "3306")
    uri = f"mysql+pymysql://{latin1_db}@127.0.0.1:{port}/{latin1_db}?read_default_file={cnf}"
    r = _script("start", _env(tmp_path / "state", TSKD_MLFLOW_DB_URI=uri))
    assert r.returncode != 0
    assert r.stdout == ""
    for part in (f"database {latin1_db}", "TSKD_MLFLOW_DB_URI", "latin1", "utf8mb4", "parent", "child",
                 f"ALTER DATABASE `{latin1_db}` CHARACTER SET utf8mb4"):
        assert part in r.stderr, f"{part!r} not in:\n{r.stderr}"
    assert "starting mlflow server" not in r.stderr
    assert pw not in r.stderr
    # Nothing was changed in a database the script does not own.
    assert _sql(f"SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
                f"WHERE SCHEMA_NAME = '{latin1_db}'").split() == ["latin1"]
