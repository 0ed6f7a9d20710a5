"""The data layer over a real (local) S3 server: moto's ThreadedMotoServer on 127.0.0.1.

Credentials are dummies set in the test's environment; the endpoint comes from
FSSPEC_S3_ENDPOINT_URL (read at call time) or from explicit storage options. s3fs instances are
cached per options, so the cache is cleared around every test.
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
from PIL import Image

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")

from perl_core.data import storage  # noqa: E402
from perl_core.data.coop import load_splits  # noqa: E402
from perl_core.data.fewshot import fewshot_splits, subsample_classes  # noqa: E402
from perl_core.data.images import ImageListDataset, ImageReadError  # noqa: E402
from perl_core.data.registry import DatasetSpec  # noqa: E402
from perl_core.data.transforms import eval_transform  # noqa: E402

pytestmark = pytest.mark.slow

SECRET = "dummy-secret-never-printed"
TINY = DatasetSpec(name="TinyS3", dataset_dir="tiny", image_dir="images",
                   template="a photo of a {}.", split_file="split_zhou_TinyS3.json", num_classes=4)
TINY_A = DatasetSpec(name="TinyS3A", dataset_dir="imagenet-adversarial", image_dir="imagenet-a",
                     template="a photo of a {}.", loader="imagenet_variant", num_classes=2,
                     test_only=True, source="ImageNet", extra={"layout": "wnid"})


def _png(mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (9, 5), 120 if mode == "L" else (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket holding a tiny CoOp split_json dataset and an ImageNet-A-style variant."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"coop-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket=name, Key=f"root/{key}", Body=body)

    classes = ["cat", "big_dog", "bird", "fish"]
    split = {s: [[f"{c}/{s}_{i}.png", y, c] for i in range(n) for y, c in enumerate(classes)]
             for s, n in (("train", 3), ("val", 2), ("test", 2))}
    for s in split.values():
        for rel, y, _ in s:
            put(f"tiny/images/{rel}", _png("L" if y == 1 else "RGB"))
    put("tiny/split_zhou_TinyS3.json", json.dumps(split).encode())
    put("imagenet-adversarial/classnames.txt",
        b"n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    put("imagenet-adversarial/imagenet-a/README.txt", b"not a class")
    for w in ("n01484850", "n01443537"):
        for i in range(2):
            put(f"imagenet-adversarial/imagenet-a/{w}/{i}.png", _png())
    put("broken/not_an_image.png", b"garbage")
    yield {"name": name, "url": f"s3://{name}/root", "split": split, "classes": classes,
           "client": client}
    s3fs.S3FileSystem.clear_instance_cache()


def test_load_splits_and_images_over_s3(bucket):
    s = load_splits(TINY, bucket["url"])
    assert s.classnames == tuple(bucket["classes"])
    assert (len(s.train), len(s.val), len(s.test)) == (12, 8, 8)
    assert s.train[0].impath == f"{bucket['url']}/tiny/images/cat/train_0.png"
    assert s.relpath(s.train[0]) == "cat/train_0.png"
    few = subsample_classes(fewshot_splits(s, 2, 1), "base")
    assert few.classnames == ("cat", "big_dog") and len(few.train) == 4
    ds = ImageListDataset(few.train, eval_transform(8))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and y == few.train[i].label  # "L" images come back RGB


def test_variant_listing_over_s3(bucket):
    s = load_splits(TINY_A, bucket["url"])
    assert s.classnames == ("goldfish", "great white shark")  # sorted wnids, README skipped
    assert [d.label for d in s.test] == [0, 0, 1, 1]
    assert s.test[0].impath == f"{bucket['url']}/imagenet-adversarial/imagenet-a/n01443537/0.png"
    x, _ = ImageListDataset(s.test, eval_transform(4))[3]
    assert x.shape == (3, 4, 4)


def test_storage_helpers(bucket):
    url = bucket["url"]
    split_url = storage.join(url, "tiny", "split_zhou_TinyS3.json")
    assert split_url == f"{url}/tiny/split_zhou_TinyS3.json"
    assert storage.exists(split_url) and not storage.exists(storage.join(url, "nope.json"))
    assert storage.isdir(storage.join(url, "tiny"))
    assert storage.read_json(split_url) == bucket["split"]
    with storage.open_binary(storage.join(url, "tiny/images/cat/train_0.png")) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    storage.write_json(storage.join(url, "out", "x.json"), {"a": 1})
    assert storage.read_json(storage.join(url, "out", "x.json")) == {"a": 1}
    fs, path = storage.open_fs(url)
    assert isinstance(fs, s3fs.S3FileSystem) and path == f"{bucket['name']}/root"


def test_explicit_storage_options_without_endpoint_env(bucket, monkeypatch):
    endpoint = storage.env_storage_options("s3")["endpoint_url"]
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    s = load_splits(TINY, bucket["url"], endpoint_url=endpoint, skip_instance_cache=True)
    assert len(s.test) == 8
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # the AWS spelling works too
    assert storage.env_storage_options("s3")["endpoint_url"] == endpoint
    ds = ImageListDataset(s.test, eval_transform(4))
    assert ds[0][0].shape == (3, 4, 4)


def test_errors_name_the_url_and_never_the_secret(bucket):
    url = bucket["url"]
    with pytest.raises(FileNotFoundError, match=rf"data root not found .*{bucket['name']}/nowhere"
                       ) as e1:
        load_splits(TINY, f"s3://{bucket['name']}/nowhere")
    bucket["client"].delete_object(Bucket=bucket["name"], Key="root/tiny/split_zhou_TinyS3.json")
    with pytest.raises(FileNotFoundError, match=rf"split file not found: {url}/tiny/"
                                                r"split_zhou_TinyS3\.json") as e2:
        load_splits(TINY, url)
    bad = ImageListDataset([type("D", (), {"impath": f"{url}/broken/not_an_image.png",
                                            "label": 0})()], eval_transform(4))
    with pytest.raises(ImageReadError, match=rf"corrupt or unsupported image {url}/broken/") as e3:
        bad[0]
    for e in (e1, e2, e3):
        assert SECRET not in str(e.value)
    opts = storage.storage_options_for(url)
    assert opts["secret"] == SECRET and SECRET not in storage.describe(url, opts)
    assert storage.redact(opts)["secret"] == "***" and storage.redact(opts)["key"] == "***"
