"""VLM-Judge: a frozen vision-language model answering questions about images, as a log-potential.

One object serves three roles (reference dual_process.md, "In this project"): a discriminative expert
in PoE sampling (``DiscriminativeExpert``, pixel space, differentiable), a differentiable loss for
Dual-Process tuning, and a black-box reward for best-of-N ranking and preference training.

Scores of one question q with wanted answer a and alternative b, for image x:

* ``yes_no`` (VQAScore-style, normalised):  s = log p(a | x, q) − log(p(a | x, q) + p(b | x, q)),
  where p(a) sums the answer's spelling variants ("Yes", " Yes"), so exp(s_a) + exp(s_b) = 1;
* ``dual_process`` (Luo et al. 2025, Dual-Process Image Generation, loss of §3):
  s = (1/|a|) Σ_t log p(a_t | x, q, a_<t)  — mean answer-token log-likelihood, logits shifted by one.

A judge's log-potential is Σ_q w_q s_q (a product of experts over questions, p_q^{w_q}).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .base import PIXEL, DiscriminativeExpert
from .overlays import apply_overlays

YES_NO_MODE = "yes_no"
DUAL_PROCESS_MODE = "dual_process"
SCORING_MODES = (YES_NO_MODE, DUAL_PROCESS_MODE)
_OPPOSITES = {"yes": "No", "no": "Yes"}


@dataclass(frozen=True)
class Question:
    """A question, the answer wanted (any short text, "Yes" by default), its weight and the alternative
    it is normalised against in ``yes_no`` mode (Yes ↔ No when not given)."""

    text: str
    answer: str = "Yes"
    weight: float = 1.0
    alternative: Optional[str] = None

    def __post_init__(self):
        if not self.text.strip():
            raise ValueError("question text is empty")
        if not self.answer.strip():
            raise ValueError(f"question {self.text!r}: the wanted answer is empty")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"question {self.text!r}: weight must be finite, got {self.weight!r}")

    @property
    def opposite(self) -> Optional[str]:
        if self.alternative:
            return self.alternative
        return _OPPOSITES.get(self.answer.strip().lower())

    def prompt(self, hint: bool = True) -> str:
        """The question, plus "Answer with A or B." when both answers are known (Dual-Process prompt)."""
        if hint and self.opposite:
            first, second = sorted([self.answer.strip(), self.opposite.strip()], key=lambda s: s.lower() != "yes")
            return f"{self.text.strip()} Answer with {first} or {second}."
        return self.text.strip()


def parse_questions(text: str) -> list[Question]:
    """One question per line: ``question | answer | weight | alternative`` (trailing fields optional).

    Blank lines and lines starting with '#' are skipped. Example: ``Is there a red car? | Yes | 2``.
    """
    questions = []
    for number, line in enumerate(str(text).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) > 4:
            raise ValueError(f"questions line {number}: expected 'question | answer | weight | alternative', got {line!r}")
        question, answer, weight, alternative = (fields + ["", "", "", ""])[:4]
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"questions line {number}: weight {weight!r} is not a number") from None
        questions.append(Question(question, answer or "Yes", weight, alternative or None))
    if not questions:
        raise ValueError("questions: write at least one question (one per line: question | answer | weight)")
    return questions


def spelling_variants(answer: str) -> list[str]:
    """"Yes" and " Yes": chat models often emit the answer with a leading space token."""
    answer = answer.strip()
    return [answer, " " + answer]


class VLMView:
    """How a frozen VLM (a :class:`~comfy_poe.experts.vlm.VLMBundle`) sees images: the chat prompt, the
    processor's token layout (cached per prompt and image size) and the differentiable pixel inputs,
    with ``overlays`` (see :mod:`overlays`) drawn on the judge's copy of the images only.
    ``before_call`` runs before every use (the node layer loads the model onto the GPU there).
    """

    def __init__(self, bundle, *, overlays: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
                 before_call: Optional[Callable[[], None]] = None):
        self.bundle = bundle
        self.overlays = list(overlays)
        self.before_call = before_call
        self._templates: dict = {}

    # ---- prompts and tokens (cached) -------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        """The full text prompt of one question, formatted with the model's chat template."""
        family, processor = self.bundle.family, self.bundle.processor
        if not family.uses_chat_template:  # PaliGemma: "<image>" + prompt; the processor adds BOS and "\n"
            return getattr(processor, "image_token", "") + question
        template = getattr(processor, "chat_template", None) or getattr(self.bundle.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"VLM folder {str(self.bundle.folder)!r} has no chat template (chat_template.jinja or "
                "tokenizer_config.json); use the instruct / chat version of the model"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.bundle.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def template(self, question: str, size: tuple[int, int]) -> dict:
        """Processor output for the prompt with one blank image of the target size (token layout)."""
        key = (question, size)
        if key not in self._templates:
            from PIL import Image

            bundle = self.bundle
            blank = Image.new("RGB", (size[1], size[0]), (127, 127, 127))
            out = bundle.processor(text=[self.prompt_text(question)], images=[blank], return_tensors="pt",
                                   **bundle.family.processor_kwargs)
            template = {k: v for k, v in out.items() if torch.is_tensor(v) and k != "labels"}
            expected = bundle.family.pixels(torch.zeros(1, 3, *size), bundle.image_processor, size).shape
            if tuple(template["pixel_values"].shape) != tuple(expected):
                raise ValueError(
                    f"{bundle.model_type}: the processor made pixel_values of shape {tuple(template['pixel_values'].shape)} "
                    f"but the differentiable path makes {tuple(expected)}; this processor configuration is not supported"
                )
            self._templates[key] = template
        return self._templates[key]

    def model_inputs(self, images: torch.Tensor, question: str) -> dict:
        """Differentiable model inputs for a batch of IMAGE tensors (N, H, W, C) and one prompt."""
        bundle = self.bundle
        n, height, width = images.shape[:3]
        size = bundle.family.target_size(bundle.image_processor, height, width)
        template = self.template(question, size)
        device, dtype = bundle.device, bundle.dtype
        nchw = images[..., :3].permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
        inputs = {k: v.to(device) for k, v in bundle.family.expand_template(template, n).items()}
        inputs["pixel_values"] = bundle.family.pixels(nchw, bundle.image_processor, size).to(dtype)
        return inputs

    def judge_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the VLM sees: the images with this judge's visual prompts drawn on a copy."""
        return apply_overlays(images, self.overlays)

    @torch.no_grad()
    def ask(self, image: torch.Tensor, question: str, max_new_tokens: int = 32) -> str:
        """Free-text answer to ``question`` about one IMAGE (1, H, W, C), seen exactly as the judge sees it."""
        if self.before_call is not None:
            self.before_call()
        inputs = self.model_inputs(self.judge_view(image[:1]), question)
        tokenizer = self.bundle.tokenizer
        output = self.bundle.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class VLMJudge(VLMView):
    """Scores images with a frozen VLM: questions, each with a wanted answer and a weight.

    ``__call__(images)`` maps ComfyUI IMAGE tensors (N, H, W, C) in [0, 1] to (N,) log-potentials and is
    differentiable w.r.t. the images. Prompts are tokenised once per (question, image size) and each
    question runs one forward pass per chunk of ``batch_size`` images; single-token answers (Yes/No)
    need only that one pass for all spelling variants of both answers.
    """

    def __init__(self, bundle, questions: Sequence[Question], mode: str = YES_NO_MODE, *,
                 overlays: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (), batch_size: int = 8,
                 hint: bool = True, before_call: Optional[Callable[[], None]] = None):
        super().__init__(bundle, overlays=overlays, before_call=before_call)
        if mode not in SCORING_MODES:
            raise ValueError(f"scoring mode must be one of {SCORING_MODES}, got {mode!r}")
        questions = list(questions)
        if not questions:
            raise ValueError("a VLM judge needs at least one question")
        if mode == YES_NO_MODE:
            for q in questions:
                if q.opposite is None:
                    raise ValueError(
                        f"question {q.text!r}: answer {q.answer!r} has no alternative to normalise against; give one "
                        f"('{q.text} | {q.answer} | {q.weight} | other answer') or use mode 'dual_process'"
                    )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.questions = questions
        self.mode = mode
        self.batch_size = int(batch_size)
        self.hint = hint
        self._token_cache: dict = {}

    def answer_tokens(self, text: str) -> tuple[int, ...]:
        if text not in self._token_cache:
            ids = tuple(self.bundle.tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise ValueError(f"answer {text!r} tokenises to nothing")
            self._token_cache[text] = ids
        return self._token_cache[text]

    # ---- log-likelihoods ----------------------------------------------------------------------------
    def _with_answer(self, inputs: dict, tokens: Sequence[int]) -> dict:
        """Append answer tokens to every per-token tensor (ids, masks, token types)."""
        ids = inputs["input_ids"]
        n, length = ids.shape
        extra = torch.tensor(tokens, dtype=ids.dtype, device=ids.device).expand(n, -1)
        out = dict(inputs)
        for key, value in inputs.items():
            if key == "pixel_values" or value.ndim != 2 or value.shape != (n, length):
                continue
            if key == "input_ids":
                fill = extra
            else:
                fill_value = 1 if key == "attention_mask" else (
                    self.bundle.family.answer_token_type if key == "token_type_ids" else 0)
                fill = torch.full_like(extra, fill_value, dtype=value.dtype)
            out[key] = torch.cat([value, fill], dim=1)
        return out

    def _logits(self, inputs: dict, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions. The slice matters: some models ignore ``logits_to_keep``
        (Qwen2-VL under transformers 4.57 returns every position)."""
        return self.bundle.model(**inputs, use_cache=False, logits_to_keep=keep).logits[:, -keep:].float()

    def sequence_logprobs(self, inputs: dict, candidates: Sequence[Sequence[int]], mean: bool = False) -> torch.Tensor:
        """(N, len(candidates)) log p(candidate | image, prompt): summed (or averaged) token log-probs.

        Single-token candidates share one forward pass on the prompt; longer ones append their tokens
        and read the logits one position earlier (the shift of causal LM losses).
        """
        columns: dict[int, torch.Tensor] = {}
        single = [i for i, c in enumerate(candidates) if len(c) == 1]
        if single:
            logp = torch.log_softmax(self._logits(inputs, 1)[:, -1], dim=-1)
            for i in single:
                columns[i] = logp[:, candidates[i][0]]
        for i, tokens in enumerate(candidates):
            if i in columns:
                continue
            k = len(tokens)
            logits = self._logits(self._with_answer(inputs, tokens), k + 1)[:, :k]
            target = torch.tensor(tokens, device=logits.device).expand(logits.shape[0], -1)
            token_logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            columns[i] = token_logp.mean(-1) if mean else token_logp.sum(-1)
        return torch.stack([columns[i] for i in range(len(candidates))], dim=1)

    def question_score(self, inputs: dict, question: Question) -> torch.Tensor:
        """(N,) score of one question for the batch in ``inputs`` (see module docstring)."""
        if self.mode == DUAL_PROCESS_MODE:
            return self.sequence_logprobs(inputs, [self.answer_tokens(question.answer.strip())], mean=True)[:, 0]
        wanted = list(dict.fromkeys(self.answer_tokens(v) for v in spelling_variants(question.answer)))
        other = list(dict.fromkeys(self.answer_tokens(v) for v in spelling_variants(question.opposite)))
        logp = self.sequence_logprobs(inputs, wanted + other)
        yes = torch.logsumexp(logp[:, : len(wanted)], dim=1)
        no = torch.logsumexp(logp[:, len(wanted):], dim=1)
        return yes - torch.logaddexp(yes, no)

    def question_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(Q, N) per-question scores of IMAGE tensors (N, H, W, C) in [0, 1]."""
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"images must be an IMAGE batch (N, H, W, C) with C = 3 or 4, got {tuple(images.shape)}")
        if self.before_call is not None:
            self.before_call()
        view = self.judge_view(images)
        rows = []
        for question in self.questions:
            prompt = question.prompt(self.hint)
            chunks = [
                self.question_score(self.model_inputs(view[start:start + self.batch_size], prompt), question)
                for start in range(0, view.shape[0], self.batch_size)
            ]
            rows.append(torch.cat(chunks))
        return torch.stack(rows).to(images.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) log-potential Σ_q w_q s_q(x)."""
        weights = torch.tensor([q.weight for q in self.questions], dtype=torch.float32, device=images.device)
        return (weights[:, None] * self.question_scores(images)).sum(0)

    def expert(self, weight: float = 1.0, name: str = "vlm_judge") -> DiscriminativeExpert:
        """This judge as a pixel-space, differentiable discriminative expert of the PoE sampler."""
        info = {"mode": self.mode, "model_type": self.bundle.model_type, "folder": str(self.bundle.folder),
                "questions": [(q.text, q.answer, q.weight) for q in self.questions]}
        return DiscriminativeExpert(self, weight=weight, space=PIXEL, differentiable=True, name=name, info=info)
