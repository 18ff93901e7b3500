"""Dev tooling: throw-away servers (:mod:`qkit.dev.servers`) and the local
Upstash-compatible endpoint (:mod:`qkit.dev.upstash`).

Runtime code never imports this package; the tests, the benchmarks, the
notebooks and the CLI's ``qkit dev ...`` commands (lazily, inside the command)
do.  It may import runtime modules, never the reverse.
"""
