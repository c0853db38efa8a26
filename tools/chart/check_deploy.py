"""The local deployment files' checks of tools/chart/check.py: deploy/Dockerfile (stages), deploy/docker-compose.yml
(commands against the binary's --help, etcd, checkpoint mount, build targets), deploy/prometheus.yml (targets) and
deploy/grafana/afnext-dashboard.json (metric names against docs/METRICS.md)."""

from __future__ import annotations

import json
import re
import shlex

import yaml

from chart_common import AFNEXT_BIN, CHART, DEPLOY, ROOT, R, check_afnext_argv, flag_values


def dockerfile_stages() -> dict[str, str]:
    stages = {}
    text = (DEPLOY / "Dockerfile").read_text()
    for m in re.finditer(r"(?im)^FROM\s+(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)\s*$", text):
        stages[m.group(2).lower()] = m.group(1)
    return stages


def check_dockerfile() -> dict[str, str]:
    R.section("deploy/Dockerfile")
    text = (DEPLOY / "Dockerfile").read_text()
    stages = dockerfile_stages()
    print(f"  stages: {', '.join(f'{k} ({v})' for k, v in stages.items())}")
    for name in ("builder", "runtime", "cuda-builder", "cuda"):
        R.check(name in stages, f"Dockerfile has stage {name}")
    R.check(stages.get("runtime", "").startswith("debian:bookworm-slim"), "runtime stage on debian:bookworm-slim")
    R.check(
        re.match(r"nvidia/cuda:(\$\{CUDA_VERSION\}|13\.0\.\d+)-runtime-ubuntu24\.04", stages.get("cuda", "")) is not None,
        "cuda stage on nvidia/cuda runtime ubuntu24.04",
    )
    cuda_version = re.search(r"(?m)^ARG CUDA_VERSION=(\S+)", text)
    R.check(bool(cuda_version) and cuda_version.group(1).startswith("13.0."), "CUDA 13.0.x")
    R.check("cargo build --release --locked -p afnext-cli" in text, "builder runs cargo build --release -p afnext-cli")
    R.check("--features cuda" in text, "cuda build uses --features cuda")
    R.check("protobuf-compiler" in text and "ca-certificates" in text, "protoc in builders, CA certificates in images")
    for stage in ("runtime", "cuda"):
        src = "builder" if stage == "runtime" else "cuda-builder"
        R.check(f"COPY --from={src} /out/afnext /usr/local/bin/afnext" in text, f"{stage} copies the {src} binary")
    R.check((DEPLOY / "Dockerfile.dockerignore").exists(), "Dockerfile.dockerignore keeps target/ out of the context")
    # The chart's GPU image is the CPU tag + image.cudaTagSuffix: the `cuda` stage, tagged "-cuda".
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    R.check(values["image"]["cudaTagSuffix"] == "-cuda" and "cuda" in stages, "chart's -cuda images come from stage cuda")
    return stages


def check_compose(stages: dict[str, str]) -> None:
    R.section(f"deploy/docker-compose.yml (flags against `{AFNEXT_BIN} <subcommand> --help`)")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose.get("services", {})
    by_sub: dict[str, list[str]] = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        entry = svc.get("entrypoint") or []
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if isinstance(entry, str):
            entry = shlex.split(entry)
        argv = list(entry) + list(cmd or [])
        if argv[:1] != ["afnext"]:
            continue
        argv = [str(a) for a in argv]
        check_afnext_argv(argv, f"compose {name}")
        sub = argv[1]
        by_sub.setdefault(sub, []).append(name)
        R.check(bool(flag_values(argv, "--metrics-listen")), f"compose {name}: --metrics-listen")
        R.check(flag_values(argv, "--etcd-endpoints") == ["http://etcd:2379"], f"compose {name}: registers via etcd")
        R.check(flag_values(argv, "--model") == ["/model"], f"compose {name}: --model /model")
        if sub in ("encoder", "decoder"):
            adv = flag_values(argv, "--advertise")
            R.check(bool(adv) and adv[0].split(":")[0] == name, f"compose {name}: --advertise {name}:PORT")
        if sub == "decoder":
            R.check(flag_values(argv, "--tp") == ["1"], f"compose {name}: TP=1")
        vols = svc.get("volumes", [])
        tiny = [v for v in vols if isinstance(v, str) and v.split(":")[1:] == ["/model", "ro"]]
        R.check(len(tiny) == 1, f"compose {name}: checkpoint mounted read-only at /model")
        if tiny:
            R.check(
                (DEPLOY / tiny[0].split(":")[0]).resolve() == (ROOT / "tests/fixtures/ckpt/tiny-a").resolve(),
                f"compose {name}: mounts tests/fixtures/ckpt/tiny-a",
            )
        build = svc.get("build", {})
        R.check(build.get("target") in stages, f"compose {name}: build target is a Dockerfile stage", str(build))
        R.check(build.get("target") == "runtime", f"compose {name}: CPU image (target runtime)")
        R.check((DEPLOY / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()
                == (DEPLOY / "Dockerfile").resolve(), f"compose {name}: builds deploy/Dockerfile")
    print("  afnext services: " + ", ".join(f"{k}: {', '.join(v)}" for k, v in sorted(by_sub.items())))
    R.check(len(by_sub.get("router", [])) == 1, "compose: 1 router")
    R.check(len(by_sub.get("encoder", [])) == 2, "compose: 2 encoders")
    R.check(len(by_sub.get("decoder", [])) == 1, "compose: 1 decoder")
    R.check("etcd" in services and "etcd" in services["etcd"].get("image", ""), "compose: etcd service")
    prom = services.get("prometheus", {})
    R.check(
        any(str(v).startswith("./prometheus.yml:") for v in prom.get("volumes", [])), "compose: Prometheus with prometheus.yml"
    )
    # prometheus.yml scrapes every afnext service on its metrics port.
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for names in by_sub.values():
        for name in names:
            listen = flag_values([str(a) for a in services[name]["command"]], "--metrics-listen")
            if listen:
                port = listen[0].rsplit(":", 1)[1]
                R.check(f"{name}:{port}" in targets, f"prometheus.yml scrapes {name}:{port}")
    print(f"  prometheus.yml targets: {', '.join(sorted(targets))}")


def metric_names() -> set[str]:
    """Metric names of docs/METRICS.md (`afnext_x_total` / `_y` shorthand expanded)."""
    names: set[str] = set()
    for line in (ROOT / "docs" / "METRICS.md").read_text().splitlines():
        last = None
        for tok in re.findall(r"`(afnext_[a-z0-9_]+|_[a-z0-9_]+)(?:\{[^`]*\})?`", line):
            if tok.startswith("afnext_"):
                names.add(tok)
                last = tok
            elif last:
                names.add(last.rsplit("_", 1)[0] + tok)
    return names


def check_dashboard() -> None:
    R.section("deploy/grafana/afnext-dashboard.json")
    try:
        dash = json.loads((DEPLOY / "grafana" / "afnext-dashboard.json").read_text())
    except json.JSONDecodeError as e:
        R.check(False, "dashboard is JSON", str(e))
        return
    R.check(isinstance(dash.get("panels"), list) and dash.get("title") and dash.get("schemaVersion"), "dashboard shape")
    known = metric_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set()
    for e in exprs:
        for m in re.findall(r"\bafnext_[a-z0-9_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            R.check(m in known or base in known, f"dashboard metric {m} is in docs/METRICS.md")
            used.add(m if m in known else base)
        R.check(e.count("(") == e.count(")") and e.count("{") == e.count("}"), f"dashboard expr balanced: {e[:60]}")
    ids = [p["id"] for p in dash["panels"]]
    R.check(len(ids) == len(set(ids)), "dashboard panel ids unique")
    wanted = {
        "afnext_requests_total", "afnext_errors_total", "afnext_time_to_first_token_seconds",
        "afnext_inter_token_latency_seconds", "afnext_request_duration_seconds", "afnext_requests_running",
        "afnext_requests_waiting", "afnext_kv_blocks_used", "afnext_prefix_cache_hits_total",
        "afnext_embedding_cache_hits_total", "afnext_audio_seconds_received_total", "afnext_windows_encoded_total",
        "afnext_encoder_windows_total", "afnext_encoder_batch_size", "afnext_encoder_queue_depth",
        "afnext_tokens_generated_total",
    }
    R.check(wanted <= used, "dashboard covers the key metrics", str(sorted(wanted - used)))
    quantiles = [e for e in exprs if e.startswith("histogram_quantile(")]
    print(f"  {len(dash['panels'])} panels, {len(exprs)} queries ({len(quantiles)} histogram_quantile), "
          f"{len(used)} of {len(known)} documented metrics")
