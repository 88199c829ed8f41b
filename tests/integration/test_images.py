"""Images as people have them: EXIF-rotated phone photos, CMYK and progressive JPEGs, 16-bit and
palette-transparent PNGs, animated GIF and WebP. Each file is generated here, next to a plain twin
that shows what it should look like; both go through the real pipeline."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.site import serve
from helpers.stores import read_silver, run_ingest
from PIL import Image

from rayclip import model, synthetic
from rayclip.images import TRANSPARENT_BACKGROUND, decode_image, inspect_image
from rayclip.stages import embed
from rayclip.store import catalog

WIDTH, HEIGHT = 320, 256  # not square, so that a missed rotation changes the shape


def upright(seed: int = 5) -> Image.Image:
    scene = synthetic.random_scenes(1, np.random.default_rng(seed))[0]
    return synthetic.render(scene, WIDTH, np.random.default_rng(seed)).resize((WIDTH, HEIGHT))


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def with_transparent_stripe(img: Image.Image) -> tuple[Image.Image, Image.Image]:
    """(RGBA whose left third is transparent over garbage pixels, what it looks like on white)."""
    noise = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH // 3, 3), dtype=np.uint8)
    rgba = img.convert("RGBA")
    rgba.paste(Image.fromarray(noise).convert("RGBA"), (0, 0))
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, : WIDTH // 3] = 0
    rgba.putalpha(Image.fromarray(alpha))
    seen = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
    return rgba, Image.alpha_composite(seen, rgba).convert("RGB")


def kinds() -> dict[str, tuple[bytes, bytes]]:
    """name -> (the quirky file, its plain twin), as bytes."""
    img = upright()
    plain_jpeg = encoded(img, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the sensor stored it turned left
    grey = img.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # mode I;16, full 16-bit range
    palette = img.quantize(63)
    palette.putpalette(palette.getpalette()[: 63 * 3] + [0, 0, 0])  # index 63: black, and transparent
    palette.paste(63, (0, 0, WIDTH // 3, HEIGHT))
    palette_seen = palette.convert("RGBA")
    palette_seen.putalpha(Image.fromarray(np.where(np.asarray(palette) == 63, 0, 255).astype(np.uint8)))
    palette_seen = Image.alpha_composite(Image.new("RGBA", palette.size, (255, 255, 255, 255)), palette_seen)
    rgba, rgba_seen = with_transparent_stripe(img)
    first = img.quantize(255).convert("RGB")
    second = Image.new("RGB", img.size, (0, 0, 0))  # a different scene: only the first frame must count
    return {
        "exif6.jpg": (encoded(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif), plain_jpeg),
        "cmyk.jpg": (encoded(img.convert("CMYK"), "JPEG", quality=95), plain_jpeg),
        "progressive.jpg": (encoded(img, "JPEG", quality=95, progressive=True), plain_jpeg),
        "grey16.png": (encoded(grey16, "PNG"), encoded(grey, "PNG")),
        "palette-alpha.png": (encoded(palette, "PNG", transparency=63), encoded(palette_seen.convert("RGB"), "PNG")),
        "rgba.png": (encoded(rgba, "PNG"), encoded(rgba_seen, "PNG")),
        "anim.gif": (encoded(first, "GIF", save_all=True, append_images=[second], duration=100), encoded(first, "PNG")),
        "anim.webp": (
            encoded(img, "WEBP", save_all=True, append_images=[second], lossless=True, duration=100),
            encoded(img, "PNG"),
        ),
    }


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[bytes, bytes]]:
    return kinds()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data), dtype=np.float64)


@pytest.mark.parametrize("name", list(kinds()))
def test_each_kind_decodes_as_its_plain_twin(images, name):
    quirky, twin = images[name]
    got, expected = pixels(quirky), pixels(twin)
    assert decode_image(quirky).mode == "RGB"
    assert got.shape == expected.shape == (HEIGHT, WIDTH, 3)  # EXIF rotation applied
    # JPEG re-encoding of a rotated or CMYK image moves pixels a little; a missed quirk moves them a lot.
    assert np.abs(got - expected).mean() < 4, name
    if name in ("palette-alpha.png", "rgba.png"):
        assert (got[:, : WIDTH // 3 - 1] == 255).all()  # the transparent stripe is the fixed white background


def test_inspect_image_reports_the_displayed_size(images):
    assert inspect_image(images["exif6.jpg"][0])[1:] == (WIDTH, HEIGHT)
    assert inspect_image(images["anim.gif"][0]) == ("gif", WIDTH, HEIGHT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_kind_through_the_real_pipeline_embeds_like_its_twin(images, ray_session, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name, (quirky, twin) in images.items():
        (site / name).write_bytes(quirky)
        (site / f"twin-{name}.{'png' if name.endswith(('.png', '.gif', '.webp')) else 'jpg'}").write_bytes(twin)
    (site / "broken.png").write_bytes(images["rgba.png"][0][:300])  # a truncated one in the same batch
    files = sorted(p.name for p in site.iterdir())
    root = tmp_path / "data"
    with serve(site) as base:
        meta = tmp_path / "m.parquet"
        pq.write_table(pa.table({"URL": [f"{base}/{f}" for f in files], "TEXT": files}), meta)
        report = run_ingest(root, meta)
    # Each file is stored or failed by a reason, never lost: img2dataset's OpenCV check or ours.
    manifest = catalog.read_manifest(root).to_pylist()
    by_name = {row["caption"]: row for row in manifest}
    assert report.failed == {"decode error": 1} and sorted(by_name) == sorted(set(files) - {"broken.png"})
    assert by_name["exif6.jpg"]["width"] == WIDTH and by_name["exif6.jpg"]["height"] == HEIGHT

    # One batch holds every kind: none of them may crash it.
    done = embed.embed(root, model.resolve(None, "reference"), actors=1, batch_size=len(files))
    assert done.rows_failed == 0 and done.rows_embedded == len({row["media_id"] for row in manifest})
    silver = read_silver(root, done.model_version)
    vectors = dict(
        zip(silver.column("media_id").to_pylist(), silver.column("embedding").to_numpy(zero_copy_only=False))
    )
    for name in images:
        twin = next(f for f in by_name if f.startswith(f"twin-{name}"))
        cosine = float(np.dot(vectors[by_name[name]["media_id"]], vectors[by_name[twin]["media_id"]]))
        assert cosine > (0.999 if name == "exif6.jpg" else 0.99), (name, cosine)


def test_fixture_files_are_what_they_claim(images):
    """Guard the generator: each quirky file really has its quirk."""
    opened = {name: Image.open(io.BytesIO(data[0])) for name, data in images.items()}
    assert opened["exif6.jpg"].getexif()[0x0112] == 6 and opened["exif6.jpg"].size == (HEIGHT, WIDTH)
    assert opened["cmyk.jpg"].mode == "CMYK"
    assert opened["progressive.jpg"].info.get("progressive") or opened["progressive.jpg"].info.get("progression")
    assert opened["grey16.png"].mode.startswith("I")
    assert opened["palette-alpha.png"].mode == "P" and "transparency" in opened["palette-alpha.png"].info
    assert opened["rgba.png"].mode == "RGBA"
    assert opened["anim.gif"].n_frames == 2 and opened["anim.webp"].n_frames == 2
