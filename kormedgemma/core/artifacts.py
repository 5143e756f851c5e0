"""The artifact contract: where each output lives and which notebook makes it.

Knowing the producer of every artifact is what lets a missing input fail at once with the
notebook to run, instead of a stack trace three cells later.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kormedgemma.core.config import ProjectConfig, resolve_path
from kormedgemma.core.io import MissingArtifactError
from kormedgemma.core.manifest import is_file_artifact, manifest_path


@dataclass(frozen=True)
class Artifact:
    key: str
    relpath: str
    producer: str  # notebook id, e.g. "0.04"
    description: str

    @property
    def shown(self) -> str:
        """The path as messages show it: folders end in `/`."""
        return self.relpath if is_file_artifact(Path(self.relpath)) else self.relpath + "/"


# Step id -> the notebook that runs it: what a missing input's error names, and the runner's table
# (pipeline.steps) reads the same paths.
NOTEBOOKS: dict[str, str] = {
    "0.00": "phase0_data_preparation/00_setup_environment.ipynb",
    "0.01": "phase0_data_preparation/01_research_datasets.ipynb",
    "0.02": "phase0_data_preparation/02_collect_korean_medical.ipynb",
    "0.03": "phase0_data_preparation/03_collect_bilingual_dict.ipynb",
    "0.04": "phase0_data_preparation/04_preprocess_data.ipynb",
    "1.01": "phase1_tokenizer/01_train_korean_tokenizer.ipynb",
    "1.02": "phase1_tokenizer/02_filter_tokens.ipynb",
    "1.03": "phase1_tokenizer/03_merge_tokenizers.ipynb",
    "1.04": "phase1_tokenizer/04_tokenize_corpus.ipynb",
    "2.01": "phase2_embedding/01_resize_embeddings.ipynb",
    "2.02": "phase2_embedding/02_initialize_embeddings.ipynb",
    "3.01": "phase3_staged_training/01_stage1_new_input_embeds.ipynb",
    "3.02": "phase3_staged_training/02_stage2_new_output_embeds.ipynb",
    "3.03": "phase3_staged_training/03_stage3_both_embeds.ipynb",
    "3.04": "phase3_staged_training/04_stage4_all_output.ipynb",
    "3.05": "phase3_staged_training/05_stage5_harmonization.ipynb",
    "3.06": "phase3_staged_training/06_stage6_qlora_full.ipynb",
    "3.07": "phase3_staged_training/07_stage7_cooldown.ipynb",
    "4.01": "phase4_instruction_tuning/01_instruction_tuning.ipynb",
    "5.01": "phase5_evaluation/01_evaluate_korean.ipynb",
    "5.02": "phase5_evaluation/02_evaluate_english.ipynb",
    "6.01": "phase6_deployment/01_quantize_awq.ipynb",
    "6.02": "phase6_deployment/02_deploy_vllm.ipynb",
}


ARTIFACTS: dict[str, Artifact] = {a.key: a for a in [
    Artifact("base_model", "models/base", "0.00", "locally built tiny Gemma 3 model + tokenizer"),
    Artifact("raw_korean", "data/raw/korean", "0.02", "collected Korean text, one JSONL per source"),
    Artifact("raw_english", "data/raw/english", "0.02", "collected English replay text"),
    Artifact("raw_kormedmcqa", "data/raw/kormedmcqa", "0.02", "KorMedMCQA as downloaded"),
    Artifact("dictionary", "data/bilingual_dict", "0.03", "Korean-English medical dictionary"),
    Artifact("korean", "data/processed/korean", "0.04", "clean Korean train/valid JSONL"),
    Artifact("english", "data/processed/english", "0.04", "clean English train/valid JSONL"),
    Artifact("kormedmcqa", "data/processed/kormedmcqa", "0.04", "validated KorMedMCQA by subset/split"),
    Artifact("korean_sp", "models/tokenizer/korean_sp", "1.01", "Korean SentencePiece model"),
    Artifact("new_tokens", "models/tokenizer/new_tokens.json", "1.02", "chosen pieces with corpus frequency"),
    Artifact("merged_tokenizer", "models/tokenizer/merged", "1.03", "base tokenizer + new Korean pieces"),
    Artifact("token_store", "data/tokens", "1.04", "processed corpora as token ids under the merged tokenizer"),
    Artifact("resized_model", "models/resized", "2.01", "base model, untied, grown to the merged vocabulary"),
    Artifact("initialized_model", "models/initialized", "2.02", "new rows initialised + merged tokenizer"),
    *(Artifact(f"stage{n}", f"models/staged_training/stage{n}", f"3.0{n}", f"EEVE stage {n}: what it trained + metrics")
      for n in range(1, 8)),
    Artifact("merged_model", "models/staged_training/merged", "3.07", "full model after stage 7, LoRA merged"),
    Artifact("instruct_model", "models/final/instruct", "4.01", "instruction-tuned model, LoRA merged"),
    Artifact("eval_korean", "models/final/eval/korean", "5.01", "KorMedMCQA accuracy, perplexity, tokenizer efficiency"),
    Artifact("eval_english", "models/final/eval/english", "5.02", "English medical retention and perplexity"),
    Artifact("awq_model", "models/final/korean_medgemma_awq", "6.01", "4-bit AWQ model + its quality and memory report"),
    Artifact("serve_check", "models/final/serve_check", "6.02", "a Korean medical answer served over the OpenAI API"),
]}


def artifact_path(config: ProjectConfig, key: str) -> Path:
    if key not in ARTIFACTS:
        raise KeyError(f"unknown artifact {key!r}; known: {', '.join(ARTIFACTS)}")
    return resolve_path(config, ARTIFACTS[key].relpath)


def is_complete(artifact: Path) -> bool:
    """An artifact counts only once its manifest is written (the last act of an atomic write)."""
    return manifest_path(artifact).is_file()


def require(config: ProjectConfig, key: str) -> Path:
    """Path of a finished input artifact, or an error naming the notebook that makes it."""
    path = artifact_path(config, key)
    if not is_complete(path):
        producer = ARTIFACTS[key].producer
        state = "incomplete (no manifest)" if path.exists() else "not found"
        raise MissingArtifactError(
            f"{ARTIFACTS[key].shown} {state}: run {NOTEBOOKS[producer]} "
            f"(or `python -m kormedgemma run --profile {config.profile} --to {producer}`)")
    return path


def link_upstream(source: ProjectConfig, target: ProjectConfig, before: str) -> None:
    """Link into `target`'s root every artifact of `source` made by a step before `before`, so a
    second root (an ablation variant, a speed run) trains from the same inputs without copying
    gigabytes. A link left dangling by an earlier run whose source moved is replaced."""
    for key, artifact in ARTIFACTS.items():
        if artifact.producer >= before:
            continue
        origin, link = artifact_path(source, key).resolve(), artifact_path(target, key)
        if link.is_symlink() and not link.exists():
            link.unlink()
        if origin.exists() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(origin, target_is_directory=origin.is_dir())
