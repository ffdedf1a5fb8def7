"""The web page: generate images in a browser and watch the denoising (`minidiffusion serve`, docs/serve.md).

`server.py` is the FastAPI app (`build_app(models)`, `main(host, port, runs)`): a bounded job queue,
validation with the command line's ranges, and a server-sent-event stream of the predicted clean
image at every k-th step, then the final images with the settings that make them again. `kinds.py`
says what each family of model takes and makes (class-conditional image models, text-to-image
pipelines; the extension point for audio). `static/` is the page itself: plain HTML, CSS and JS,
no build step, nothing fetched from elsewhere.

Like the command line, this package uses the pipelines and never the training code (recipes,
learner), and nothing imports it but the command line. It needs the `web` extra (FastAPI, uvicorn,
python-multipart).
"""
