"""What scripts/pulsar-standalone and scripts/pulsar-cluster share: Pulsar's jars, a java, tokens, test certificates."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

#: The one place the Pulsar versions are named, newest first: the first that resolves
#: runs. Maven Central as reached here serves pulsar-broker 4.0.7 with its dependencies;
#: 4.0.8 lacks two of them (jetcd-core-shaded, pulsar-opentelemetry) on 2026-11-29.
#: 3.0.0 (--version 3.0.0) is the only 3.0.x whose broker Maven Central serves here.
PULSAR_VERSIONS = ("4.0.8", "4.0.7")
#: The machine's Maven 3.8 spends hours resolving Pulsar's dependency graph; 3.9 takes seconds.
MAVEN_VERSION = "3.9.9"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eventbus"
POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <!-- Pulsar's root pom pins the versions its own build used (grpc, netty, ...). -->
  <parent>
    <groupId>org.apache.pulsar</groupId><artifactId>pulsar</artifactId>
    <version>{v}</version><relativePath/>
  </parent>
  <groupId>eventbus.tools</groupId><artifactId>pulsar-standalone</artifactId>
  <version>{v}</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.pulsar</groupId><artifactId>pulsar-broker</artifactId><version>{v}</version></dependency>
  </dependencies>
</project>
"""
# Some Pulsar poms name extra repositories this machine cannot reach: send them to Central.
MAVEN_SETTINGS = """<settings><mirrors><mirror><id>central-only</id><mirrorOf>*</mirrorOf>
<url>https://repo.maven.apache.org/maven2</url></mirror></mirrors></settings>
"""
JVM_FLAGS = [
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=10", "-XX:+ParallelRefProcEnabled",
    "-Dio.netty.tryReflectionSetAccessible=true", "-Dpulsar.allocator.exit_on_oom=true",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED", "--add-opens", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-opens", "java.base/sun.net=ALL-UNNAMED", "--add-opens", "java.management/sun.management=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
]


NAME = "pulsar"  # the script's name, for its messages


class Failure(Exception):
    pass


def log(msg: str) -> None:
    print(f"{NAME}: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, timeout: float = 1200) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise Failure(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise Failure(f"{what}: no answer within {timeout:.0f}s") from None
    if result.returncode != 0:
        tail_text = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise Failure(f"{what} failed (exit {result.returncode}):\n{tail_text}")


def maven() -> str:
    home = CACHE / f"apache-maven-{MAVEN_VERSION}"
    if not (home / "bin" / "mvn").exists():
        log(f"fetching Maven {MAVEN_VERSION} from Maven Central")
        CACHE.mkdir(parents=True, exist_ok=True)
        run(["mvn", "-q", "-B", "dependency:copy", f"-Dartifact=org.apache.maven:apache-maven:{MAVEN_VERSION}:tar.gz:bin",
             f"-DoutputDirectory={CACHE}"], "fetching Maven")
        with tarfile.open(CACHE / f"apache-maven-{MAVEN_VERSION}-bin.tar.gz") as tar:
            tar.extractall(CACHE)
    return str(home / "bin" / "mvn")


def classpath(version: str) -> str:
    cached = CACHE / f"pulsar-{version}.classpath"
    if cached.exists():
        cp = cached.read_text().strip()
        if cp and all(Path(p).exists() for p in cp.split(":")):
            return cp
    log(f"resolving Apache Pulsar {version} (pulsar-broker and dependencies) from Maven Central")
    work = CACHE / f"pulsar-{version}-pom"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM.format(v=version))
    (work / "settings.xml").write_text(MAVEN_SETTINGS)
    run([maven(), "-q", "-B", "-f", str(work / "pom.xml"), "-s", str(work / "settings.xml"),
         "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:build-classpath", "-DincludeScope=runtime",
         f"-Dmdep.outputFile={cached}"], f"resolving Pulsar {version} with Maven")
    return cached.read_text().strip()


def pick_version(asked: str) -> tuple[str, str]:
    """The version to run and its classpath: the one asked for, or the newest of PULSAR_VERSIONS that resolves."""
    if asked:
        return asked, classpath(asked)
    problems = []
    for version in PULSAR_VERSIONS:
        refused = CACHE / f"pulsar-{version}.unresolvable"
        if refused.exists() and time.time() - refused.stat().st_mtime < 24 * 3600:
            problems.append(f"{version}: did not resolve within the last day")
            continue  # asked once a day at most: a failed resolution costs minutes
        try:
            return version, classpath(version)
        except Failure as exc:
            CACHE.mkdir(parents=True, exist_ok=True)
            refused.write_text(str(exc))
            problems.append(f"{version}: {str(exc).splitlines()[0]}")
            log(f"Apache Pulsar {version} does not resolve here; trying the next")
    raise Failure("no Apache Pulsar version resolved: " + "; ".join(problems))


def java_for(version: str) -> str:
    """A java that runs `version`: 4.x needs 21 or newer, found in JAVA_HOME or under /usr/lib/jvm."""
    if int(version.split(".")[0]) < 4:
        if shutil.which("java") is None:
            raise Failure("java is not installed: the real-broker suite needs Java and Maven")
        return "java"
    homes = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    homes += sorted(Path("/usr/lib/jvm").glob("*")) if Path("/usr/lib/jvm").is_dir() else []
    found = []
    for home in homes:
        release = home / "release"
        if (home / "bin" / "java").exists() and release.exists():
            for line in release.read_text().splitlines():
                if line.startswith("JAVA_VERSION="):
                    major = int(line.split("=", 1)[1].strip('"').split(".")[0])
                    if major >= 21:
                        found.append((major, str(home / "bin" / "java")))
    if not found:
        raise Failure(f"Apache Pulsar {version} needs Java 21 or newer: set JAVA_HOME to one (or pass --version 3.0.0)")
    return min(found)[1]  # the oldest that is new enough: the one Pulsar is most tried on


def jwt(secret: bytes, subject: str) -> str:
    """An HS256 token, as `pulsar tokens create --secret-key ... --subject` makes."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256"}, separators=(",", ":")).encode())
    body = b64(json.dumps({"sub": subject}, separators=(",", ":")).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def admin_call(url: str, token: str, method: str, path: str, body: object = None, timeout: float = 10) -> object:
    """One admin REST call as `token`'s role; the answer's JSON (None when empty)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
        return json.loads(text) if text else None


def make_certs(certs: Path) -> None:
    """A test CA, a broker certificate for localhost/127.0.0.1 signed by it, and an unrelated CA."""
    certs.mkdir()
    ssl = ["openssl"]
    run(ssl + ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", "/CN=eventbus test CA",
               "-keyout", str(certs / "ca.key.pem"), "-out", str(certs / "ca.cert.pem")], "making the test CA")
    run(ssl + ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", "/CN=some other CA",
               "-keyout", str(certs / "other-ca.key.pem"), "-out", str(certs / "other-ca.cert.pem")], "making another CA")
    run(ssl + ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
               "-keyout", str(certs / "broker.key.pem"), "-out", str(certs / "broker.csr")], "making the broker key")
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(ssl + ["x509", "-req", "-days", "7", "-in", str(certs / "broker.csr"), "-CA", str(certs / "ca.cert.pem"),
               "-CAkey", str(certs / "ca.key.pem"), "-CAcreateserial", "-extfile", str(certs / "san.ext"),
               "-out", str(certs / "broker.cert.pem")], "signing the broker certificate")
    # The broker wants its key in PKCS#8.
    run(ssl + ["pkcs8", "-topk8", "-nocrypt", "-in", str(certs / "broker.key.pem"),
               "-out", str(certs / "broker.key-pk8.pem")], "converting the broker key")
