"""The callback protocol: `Callback` and the dispatcher that calls its hooks (`callback`), and
`TrainerView`, everything a callback may read and call (`view`). It imports no concrete
callback but the defaults the dispatcher adds."""
