"""What the RL stages (ppo, grpo, dpo's end comparison, upft's sampling) share, one job per module:

    maths             policy-gradient arithmetic (GAE, whitening, clipped losses, KL estimates, entropy)
    advantages        PPO's advantage estimators by name (gae; critic-free rloo, reinforce_pp)
    rollout           sample responses and score them (policy, reference, value model, reward)
    reference         the frozen reference policy; how models that only score load
    reward            the reward (a reward model or a function of the texts) and `load_reward`
    reward_functions  known reward functions of the text, e.g. "ftl.rl.reward_functions:count_substring"
    compare           the policy against its reference on held-out prompts (reward, win rate, KL, samples)

Imports go downward only: config, data, models, methods ← rl ← evaluate (`ftl eval` of a policy run), stages.
Nothing here imports a stage or the evaluation layer.
"""
