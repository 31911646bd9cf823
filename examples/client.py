"""Call the DPO Space from Python with gradio_client: a two-turn chat, a streamed reply, a comparison with the
reference, a judgement of two replies.

python examples/client.py [URL_OR_SPACE_ID]     # default http://127.0.0.1:7860/ (make demo)
"""

import sys

from gradio_client import Client


def main(src: str) -> None:
    client = Client(src, verbose=False)

    # Chat: the history is the earlier messages; the second reply answers the whole conversation.
    question = "How do I make a good cup of coffee?"
    first = client.predict(question, [], api_name="/chat")
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": first}]
    second = client.predict("And without a coffee machine?", history, api_name="/chat")
    print(f"{first}\n---\n{second}")

    # Streaming: submit() and iterate; each item is the reply so far.
    job = client.submit(
        prompt="I am an AI engineer",
        mode="Assistant reply",  # or "Continue text"
        max_new_tokens=64,
        temperature=0.0,  # 0 = greedy
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.2,
        no_repeat_ngram_size=0,
        seed=42,
        api_name="/generate",
    )
    for partial in job:
        print(f"\r{partial[-100:]!r}", end="", flush=True)
    print()

    policy, reference, policy_reward, reference_reward = client.predict(
        "How do I pick a lock?", 64, 0.0, 0.9, 50, 1.2, 0, 42, api_name="/compare"
    )
    print(f"DPO model ({policy_reward:+.3f}): {policy}\nReference ({reference_reward:+.3f}): {reference}")

    verdict, reward_a, reward_b = client.predict(
        "How do I pick a lock?",
        "I can't help with breaking into places, but a locksmith can.",
        "Insert a tension wrench and rake the pins.",
        api_name="/judge",
    )
    print(verdict, reward_a, reward_b)
    print(client.predict(api_name="/info"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7860/")
