"""Draw a toy DreamBooth subject: a little wooden robot photographed five times.

The robot has an orange box body with teal zig-zag stripes, a yellow star on
its chest, a square orange head with round eyes and a teal antenna with a red
ball. Each of the five images shows the same robot at a different position,
size, tilt and viewing angle, against a different background and lighting, so
the set looks like five photos of one object. Shapes and colours are kept
coarse on purpose, because tiny diffusion models learn coarse features best.

Only PIL and numpy are used and nothing is random, so reruns give identical
files.

Run:
    python examples/draw_toy_subject.py
    python examples/draw_toy_subject.py --output_dir /tmp/toy --size 256
"""

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SPRITE_SIZE = 512

ORANGE = (240, 120, 30)
DARK_ORANGE = (190, 85, 20)
TEAL = (20, 170, 160)
YELLOW = (255, 215, 40)
RED = (220, 40, 40)
WOOD = (180, 130, 80)
DARK_WOOD = (120, 80, 45)
EYE_WHITE = (250, 250, 245)
EYE_BLACK = (25, 25, 30)


@dataclass(frozen=True)
class ViewSettings:
    """How one photo frames the robot; positions and scale are fractions of the image size."""

    center_x: float
    center_y: float
    scale: float
    rotation_degrees: float
    horizontal_squash: float
    background_top: tuple
    background_bottom: tuple
    light_angle_degrees: float
    light_strength: float


VIEWS = (
    ViewSettings(0.50, 0.52, 0.78, 0.0, 1.00, (200, 225, 245), (150, 185, 215), 135.0, 0.25),
    ViewSettings(0.40, 0.56, 0.62, -8.0, 0.85, (245, 230, 205), (205, 180, 150), 45.0, 0.35),
    ViewSettings(0.60, 0.50, 0.90, 6.0, 0.92, (215, 240, 210), (160, 200, 160), 200.0, 0.30),
    ViewSettings(0.55, 0.60, 0.50, 12.0, 0.75, (235, 215, 235), (185, 160, 195), 90.0, 0.40),
    ViewSettings(0.46, 0.48, 0.70, -4.0, 0.96, (240, 240, 240), (175, 175, 180), 300.0, 0.20),
)


def star_points(center_x, center_y, outer_radius, inner_radius, tips=5):
    points = []
    for index in range(tips * 2):
        radius = outer_radius if index % 2 == 0 else inner_radius
        angle = -math.pi / 2 + index * math.pi / tips
        points.append((center_x + radius * math.cos(angle), center_y + radius * math.sin(angle)))
    return points


def zigzag_points(left, right, center_y, amplitude, teeth):
    step = (right - left) / (teeth * 2)
    return [
        (left + index * step, center_y + (amplitude if index % 2 else -amplitude))
        for index in range(teeth * 2 + 1)
    ]


def draw_limbs(draw):
    draw.rounded_rectangle((95, 225, 150, 380), radius=22, fill=WOOD, outline=DARK_WOOD, width=6)
    draw.rounded_rectangle((362, 225, 417, 380), radius=22, fill=WOOD, outline=DARK_WOOD, width=6)
    draw.rounded_rectangle((185, 390, 235, 480), radius=14, fill=WOOD, outline=DARK_WOOD, width=6)
    draw.rounded_rectangle((277, 390, 327, 480), radius=14, fill=WOOD, outline=DARK_WOOD, width=6)
    draw.rounded_rectangle((170, 465, 245, 500), radius=12, fill=DARK_WOOD)
    draw.rounded_rectangle((267, 465, 342, 500), radius=12, fill=DARK_WOOD)


def draw_body(draw):
    body_box = (140, 205, 372, 410)
    draw.rounded_rectangle(body_box, radius=26, fill=ORANGE, outline=DARK_ORANGE, width=8)
    for stripe_y in (240, 375):
        draw.line(zigzag_points(158, 354, stripe_y, 13, 5), fill=TEAL, width=14, joint="curve")
    draw.polygon(star_points(256, 308, 62, 26), fill=YELLOW, outline=DARK_ORANGE, width=4)


def draw_head(draw):
    draw.line((256, 40, 256, 95), fill=TEAL, width=12)
    draw.ellipse((233, 18, 279, 64), fill=RED, outline=DARK_ORANGE, width=4)
    head_box = (170, 85, 342, 210)
    draw.rounded_rectangle(head_box, radius=24, fill=ORANGE, outline=DARK_ORANGE, width=8)
    for eye_center_x in (218, 294):
        draw.ellipse((eye_center_x - 25, 115, eye_center_x + 25, 165), fill=EYE_WHITE)
        draw.ellipse((eye_center_x - 13, 127, eye_center_x + 13, 153), fill=EYE_BLACK)
    draw.rounded_rectangle((225, 178, 287, 192), radius=6, fill=TEAL)


def draw_robot_sprite():
    """The robot facing the camera on a transparent square canvas."""
    sprite = Image.new("RGBA", (SPRITE_SIZE, SPRITE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    draw_limbs(draw)
    draw_body(draw)
    draw_head(draw)
    return sprite


def vertical_gradient(size, top_color, bottom_color):
    blend = np.linspace(0.0, 1.0, size)[:, None, None]
    top = np.array(top_color, dtype=np.float64)
    bottom = np.array(bottom_color, dtype=np.float64)
    column = top * (1.0 - blend) + bottom * blend
    return np.repeat(column, size, axis=1)


def apply_directional_light(pixels, light_angle_degrees, strength):
    """Brighten the side the light comes from and darken the opposite side."""
    size = pixels.shape[0]
    coordinates = np.linspace(-1.0, 1.0, size)
    grid_x, grid_y = np.meshgrid(coordinates, coordinates)
    angle = math.radians(light_angle_degrees)
    toward_light = grid_x * math.cos(angle) - grid_y * math.sin(angle)
    gain = 1.0 + strength * 0.5 * toward_light
    return np.clip(pixels * gain[:, :, None], 0, 255)


def transform_sprite(sprite, view, image_size):
    target_height = max(1, round(view.scale * image_size))
    target_width = max(1, round(target_height * view.horizontal_squash))
    resized = sprite.resize((target_width, target_height), Image.LANCZOS)
    return resized.rotate(view.rotation_degrees, resample=Image.BICUBIC, expand=True)


def contact_shadow(image_size, view):
    shadow = Image.new("L", (image_size, image_size), 0)
    half_width = 0.28 * view.scale * view.horizontal_squash * image_size
    half_height = 0.05 * view.scale * image_size
    feet_y = (view.center_y + 0.46 * view.scale) * image_size
    center_x = view.center_x * image_size
    ImageDraw.Draw(shadow).ellipse(
        (center_x - half_width, feet_y - half_height, center_x + half_width, feet_y + half_height),
        fill=110,
    )
    return shadow.filter(ImageFilter.GaussianBlur(radius=max(1.0, image_size / 80)))


def render_view(sprite, view, image_size):
    background = vertical_gradient(image_size, view.background_top, view.background_bottom)
    scene = Image.fromarray(background.astype(np.uint8), "RGB")
    scene.paste((40, 35, 30), (0, 0), contact_shadow(image_size, view))
    robot = transform_sprite(sprite, view, image_size)
    left = round(view.center_x * image_size - robot.width / 2)
    top = round(view.center_y * image_size - robot.height / 2)
    scene.paste(robot, (left, top), robot)
    pixels = np.asarray(scene, dtype=np.float64)
    lit = apply_directional_light(pixels, view.light_angle_degrees, view.light_strength)
    return Image.fromarray(lit.astype(np.uint8), "RGB")


def parse_arguments(argv):
    default_output_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_subject")
    parser = argparse.ArgumentParser(
        description="Draw five photos of a toy robot for DreamBooth examples."
    )
    parser.add_argument(
        "--output_dir", default=default_output_dir, help="folder the PNG files are written to"
    )
    parser.add_argument(
        "--size", type=int, default=256, help="width and height of each image in pixels"
    )
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    os.makedirs(arguments.output_dir, exist_ok=True)
    sprite = draw_robot_sprite()
    for index, view in enumerate(VIEWS, start=1):
        path = os.path.join(arguments.output_dir, f"toy_{index:02d}.png")
        render_view(sprite, view, arguments.size).save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
