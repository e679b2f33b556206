"""The application layer: one function per use case, typed requests in, results out.

`runner.cli` parses arguments into the frozen requests of `requests`, calls one of
these functions, prints what it returns and maps errors to exit codes. `waggle ci` and
`waggle watch` build requests of their own (from the CI context and waggle.yaml, or per
fetched commit) and call the same use cases. Nothing here knows about argparse.

- `run.apply`: build, apply (every goal), upload-keys: evaluate, build, deploy, report;
- `plan.plan`: what a git change would do;
- `ci.run_ci`: the CI step (plan on pull requests, deploy on pushes, build otherwise);
- `watch.run_watch`: deploy each new head of a git ref;
- `hosts.exec_command`, `hosts.apply_local`: one command on many hosts; this machine;
- `inspect`: eval/introspect, nodes, nix-info.
"""
