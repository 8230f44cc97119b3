"""The conformance zoo: every architecture ``transformers`` builds from a config (and a few vendored
public model files), shrunk to a tiny config, through capture, each pass, a few stacks and the ONNX
Runtime export, each result judged verified / no-op / clear refusal / failure / silently wrong.

    python -m tools.zoo run --checks identity                   # every architecture, identity only
    python -m tools.zoo run --every 3 --jobs 1                  # all checks on every 3rd architecture
    python -m tools.zoo run --only gpt2,hf:whisper --checks sas,onnx
    python -m tools.zoo table                                   # docs/conformance.md (+ the README summary)
    python -m tools.zoo one hf:vit --checks identity,sas        # one architecture, results as JSON lines

Modules: ``catalog`` (what runs), ``shrink`` (tiny configs from each config's own fields), ``build``
(the spec, through effcompile's ``load_hf_spec``), ``judges`` (dead parameters, aliases, loss
trajectories), ``checks`` (run and judge one check), ``runner`` (subprocesses, shards, resumable JSONL),
``table`` (the conformance table).
"""
