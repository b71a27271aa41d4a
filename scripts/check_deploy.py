"""Checks deploy/ files that have no dedicated checker: the Tailscale policy (HuJSON), the
container image definition, and the castvault config embedded in the Kubernetes ConfigMap
(through `castvault config check`). Exits non-zero on the first problem, naming it."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def fail(message: str) -> None:
    print(f"deploy check failed: {message}", file=sys.stderr)
    sys.exit(1)


def hujson_to_json(text: str) -> str:
    """Standardizes HuJSON (JSON with comments and trailing commas) as Tailscale does."""
    out, i, in_string = [], 0, False
    while i < len(text):
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        else:
            out.append(c)
        i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def check_policy() -> None:
    path = DEPLOY / "tailscale/policy.hujson"
    try:
        policy = json.loads(hujson_to_json(path.read_text()))
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid HuJSON: {e}")
    owned = set(policy.get("tagOwners", {}))
    for rule in policy.get("ssh", []):
        for key in ("action", "src", "dst", "users"):
            if key not in rule:
                fail(f"{path}: ssh rule without {key!r}: {rule}")
        recorders = rule.get("recorder", [])
        if not recorders or rule.get("enforceRecorder") is not True:
            fail(f"{path}: ssh rule not recorded with enforceRecorder: {rule}")
        for tag in recorders + rule["dst"]:
            if tag.startswith("tag:") and tag not in owned:
                fail(f"{path}: {tag} has no tagOwners entry")
    print(f"{path.relative_to(ROOT)}: valid HuJSON, {len(policy['ssh'])} recorded ssh rules")


def check_dockerfile() -> None:
    path = DEPLOY / "container/Dockerfile"
    parser = DockerfileParser(path=str(path))
    stages = [i for i in parser.structure if i["instruction"] == "FROM"]
    known = {"COMMENT", "FROM", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE", "STOPSIGNAL",
             "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL", "HEALTHCHECK"}
    for i in parser.structure:
        if i["instruction"] not in known:
            fail(f"{path}:{i['startline'] + 1}: unknown instruction {i['instruction']}")
    if len(stages) < 2:
        fail(f"{path}: expected a build stage and a runtime stage")
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    if not users or users[-1] in ("root", "0"):
        fail(f"{path}: the image must run as a non-root user")
    entry = [i for i in parser.structure if i["instruction"] == "ENTRYPOINT"]
    if not entry or not entry[-1]["value"].startswith("["):
        fail(f"{path}: ENTRYPOINT must be exec form")
    json.loads(entry[-1]["value"])
    print(f"{path.relative_to(ROOT)}: {len(stages)} stages, runs as {users[-1]}")


def check_configmap_config(binary: str) -> None:
    path = DEPLOY / "kubernetes/castvault.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    maps = [d for d in docs if d.get("kind") == "ConfigMap"]
    if not maps:
        fail(f"{path}: no ConfigMap")
    toml = maps[0]["data"]["castvault.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(toml)
        f.flush()
        # What the workload identity webhook injects into the pod (placeholders).
        env = {
            "PATH": "/usr/bin:/bin",
            "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
            "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000000",
            "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
        }
        run = subprocess.run([binary, "config", "check", "--config", f.name],
                             capture_output=True, text=True, env=env)
    if run.returncode != 0:
        fail(f"{path}: castvault config check: {run.stdout}{run.stderr}")
    print(f"{path.relative_to(ROOT)}: ConfigMap castvault.toml passes castvault config check")


if __name__ == "__main__":
    check_policy()
    check_dockerfile()
    check_configmap_config(sys.argv[1])
