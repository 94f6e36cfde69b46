#!/usr/bin/env python3
"""Offline validation of the YAML ferry ships or prints, for ferry's tests.

  validate-manifests.py k8s VERSION CRDS_FILE FILE...
      every object of FILE (multi-document YAML, e.g. `kubectl kustomize` output) against
      the Kubernetes VERSION schemas shipped by the kubernetes-validate package, strictly
      (unknown fields fail); objects of a kind defined by a CustomResourceDefinition found
      in CRDS_FILE are validated against that CRD's own openAPIV3Schema instead.
  validate-manifests.py istio SCHEMA_DIR FILE...
      every object against SCHEMA_DIR/<kind in lowercase>.json (ferry's strict subsets of
      Istio's CRD schemas); an object of any other kind fails.
  validate-manifests.py subset SCHEMA_DIR UPSTREAM_CRD_ALL_YAML
      checks the strict subsets against Istio's own CRD file (crd-all.gen.yaml): every
      property ferry's schema allows exists upstream with the same type, and every enum
      value is allowed upstream. Run by hand when Istio moves.

"-" as FILE reads stdin. Prints one line per object; exits 1 if anything failed.
"""

import json
import os
import sys

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def docs(path):
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def ident(d):
    m = d.get("metadata") or {}
    ns = m.get("namespace")
    return f"{d.get('kind')}/{(ns + '/') if ns else ''}{m.get('name')}"


def strict(schema):
    """A CRD schema as `kubectl apply --validate=strict` reads it: unknown fields fail
    where the schema neither allows extra properties nor preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas(path):
    """(group, kind) -> {version: strict openAPIV3Schema} for every CRD in the file."""
    out = {}
    for d in docs(path):
        if d.get("kind") != "CustomResourceDefinition":
            continue
        spec = d["spec"]
        for v in spec["versions"]:
            schema = strict(v["schema"]["openAPIV3Schema"])
            out.setdefault((spec["group"], spec["names"]["kind"]), {})[v["name"]] = schema
    return out


def check(schema, d, registry=None):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    v = cls(schema, registry=registry) if registry is not None else cls(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in v.iter_errors(d)
    ]


def cmd_k8s(version, crds_file, files):
    import kubernetes_validate

    crds = crd_schemas(crds_file)
    failed = 0
    for f in files:
        for d in docs(f):
            group, _, ver = d.get("apiVersion", "").rpartition("/")
            if (group, d.get("kind")) in crds:
                schema = crds[(group, d["kind"])].get(ver)
                errs = (
                    check(schema, d)
                    if schema is not None
                    else [f"CRD has no version {ver}"]
                )
                how = "CRD schema"
            else:
                how = f"Kubernetes {version} (strict)"
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                    errs = []
                except kubernetes_validate.ValidationError as e:
                    errs = [f"{'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}"]
                except Exception as e:  # schema not found, version not supported
                    errs = [f"{type(e).__name__}: {e}"]
            report(ident(d), how, errs)
            failed += bool(errs)
    return failed


def cmd_istio(schema_dir, files):
    resources = {}
    for name in os.listdir(schema_dir):
        if name.endswith(".json"):
            with open(os.path.join(schema_dir, name), encoding="utf-8") as fh:
                resources[name] = Resource.from_contents(json.load(fh), default_specification=DRAFT202012)
    registry = Registry().with_resources(resources.items())
    failed = 0
    seen = 0
    for f in files:
        for d in docs(f):
            seen += 1
            name = f"{str(d.get('kind', '')).lower()}.json"
            if name not in resources or name == "metadata.json":
                errs = [f"no schema for kind {d.get('kind')!r} in {schema_dir}"]
            else:
                errs = check(resources[name].contents, d, registry)
            report(ident(d), "Istio schema", errs)
            failed += bool(errs)
    if seen == 0:
        print("FAIL: no objects to validate")
        failed += 1
    return failed


def walk(mine, up, path, problems):
    if not isinstance(mine, dict):
        return
    if up is None:
        problems.append(f"{path}: not in the upstream schema")
        return
    t = mine.get("type")
    if t and up.get("type") and t != up["type"]:
        problems.append(f"{path}: type {t}, upstream {up['type']}")
    if "enum" in mine and "enum" in up:
        extra = set(mine["enum"]) - set(up["enum"])
        if extra:
            problems.append(f"{path}: enum values {sorted(extra)} not upstream")
    for k, v in (mine.get("properties") or {}).items():
        walk(v, (up.get("properties") or {}).get(k), f"{path}.{k}", problems)
    if isinstance(mine.get("items"), dict):
        walk(mine["items"], up.get("items"), f"{path}[]", problems)
    if isinstance(mine.get("additionalProperties"), dict):
        walk(mine["additionalProperties"], up.get("additionalProperties"), f"{path}{{}}", problems)


def cmd_subset(schema_dir, upstream):
    kinds = {}
    for d in docs(upstream):
        if d.get("kind") == "CustomResourceDefinition":
            for v in d["spec"]["versions"]:
                if v["name"] == "v1":
                    kinds[d["spec"]["names"]["kind"].lower()] = v["schema"]["openAPIV3Schema"]
    failed = 0
    for name in sorted(os.listdir(schema_dir)):
        kind = name.removesuffix(".json")
        if not name.endswith(".json") or kind == "metadata":
            continue
        with open(os.path.join(schema_dir, name), encoding="utf-8") as fh:
            mine = json.load(fh)
        problems = []
        walk(mine["properties"]["spec"], (kinds.get(kind) or {}).get("properties", {}).get("spec"), "spec", problems)
        report(kind, "upstream subset", problems)
        failed += bool(problems)
    return failed


def report(what, how, errs):
    if errs:
        print(f"FAIL {what} ({how})")
        for e in errs:
            print(f"  {e}")
    else:
        print(f"ok   {what} ({how})")


def main(argv):
    if len(argv) >= 4 and argv[1] == "k8s":
        failed = cmd_k8s(argv[2], argv[3], argv[4:])
    elif len(argv) >= 3 and argv[1] == "istio":
        failed = cmd_istio(argv[2], argv[3:])
    elif len(argv) == 4 and argv[1] == "subset":
        failed = cmd_subset(argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"{'FAILED' if failed else 'all valid'}: {failed} object(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
