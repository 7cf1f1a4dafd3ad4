from loragrid import export as gguf_export

# The optional GGUF export (config key export.enabled): llama.cpp's converter, kept once per
# llama-cpp-python version in resources/, and one export job per run.
EXPORT = config["export"]
EXPORT_RUNS = list(RUNS) if EXPORT["enabled"] else []
try:
    LLAMA_CPP_VERSION = gguf_export.llama_cpp_version(required=bool(EXPORT_RUNS))
    CONVERTER_DIR = f"resources/tools/llama.cpp-{LLAMA_CPP_VERSION}"
    # Where the model and the converter are already here, a model the converter cannot read fails
    # now, before any training; otherwise each export job checks it before converting.
    if EXPORT_RUNS and Path(CONVERTER_DIR, "source.json").exists() and Path(MODEL_DIR, "config.json").exists():
        gguf_export.check_exportable(MODEL_DIR, CONVERTER_DIR, f"the model {MODEL}")
except LoragridError as error:
    raise WorkflowError(str(error)) from None
GGUF_DIR = f"{RESULTS}/gguf"


rule fetch_converter:
    output:
        directory(CONVERTER_DIR),
    log:
        f"{LOGS}/fetch_converter/llama.cpp-{LLAMA_CPP_VERSION}.log",
    conda:
        "../envs/export.yaml"
    params:
        version=LLAMA_CPP_VERSION,
    script:
        "../scripts/fetch_converter.py"


rule export:
    input:
        unpack(export_inputs),
    output:
        gguf=exported(".gguf"),
        modelfiles=exported(".Modelfile"),
        answers=exported(".answers.jsonl"),
        summary=f"{GGUF_DIR}/{{run}}.json",
    log:
        f"{LOGS}/export/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/export/{{run}}.tsv"
    wildcard_constraints:
        run=one_of(EXPORT_RUNS),
    conda:
        "../envs/export.yaml"
    params:
        export=canonical(EXPORT),
        generate=generation_settings(config["generate"]),
        template=TEMPLATE,
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/export.py"
