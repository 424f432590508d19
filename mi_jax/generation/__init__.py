"""The long-video controls of generation, used by `mi_jax.pipeline` (`Pipeline.stream`) and
`mi_jax.live`:

- `controls`: read from user input before anything is compiled: the prompt schedule, voice
  activity per audio track, the speaker timeline, and what they mean per sampler window (which
  prompt, where a silent speaker's mouth rests).
- `colour_anchor`: holds a long video's colour on the portrait's as the frames stream out.

`mi_jax.eval.controls` measures them on a model.
"""
