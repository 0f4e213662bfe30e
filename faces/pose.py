"""Head pose (yaw, pitch, roll in degrees) from six 2-D landmarks and a generic 3-D face.

Sign convention (dynamicid.schemas.labels): yaw > 0 when the nose points towards the image's right, pitch > 0
looking up, roll > 0 when the eye line turns clockwise in the image. The angles are read off the solved
rotation directly (facing direction and eye line in camera space), not from an Euler decomposition.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Generic face (arbitrary units) in a camera-aligned frame: x to the image's right, y down, z away from the
# camera. Rows: nose tip, chin, image-left and image-right outer eye corners, image-left and image-right
# mouth corners. Left/right symmetric, so a mirrored photo gives exactly mirrored angles.
_GENERIC_FACE = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.0, 330.0, 65.0],
        [-225.0, -170.0, 135.0],
        [225.0, -170.0, 135.0],
        [-150.0, 150.0, 125.0],
        [150.0, 150.0, 125.0],
    ],
    dtype=np.float64,
)
# The generic face leans back relative to MediaPipe's mesh: untilted, the portraits of
# ../shared/data/faces/identities read a median pitch of -7.6 degrees; tilted by 8 degrees, 0.3.
_TILT = np.radians(8.0)
_TILT_MATRIX = np.array([[1, 0, 0], [0, np.cos(_TILT), -np.sin(_TILT)], [0, np.sin(_TILT), np.cos(_TILT)]])
FACE_MODEL_3D = _GENERIC_FACE @ _TILT_MATRIX.T

# The same face at the 5 keypoints (eye centres, nose tip, mouth corners), for when only those are known.
# Eye-centre depth 125 was measured: against the 6-point mesh pose on identities/, yaw differs by 1.8 degrees
# (median; 4.3 at the 90th percentile), pitch by 3.6 (8.5).
_GENERIC_KPS5 = np.array(
    [[-157.0, -170.0, 125.0], [157.0, -170.0, 125.0], [0.0, 0.0, 0.0], [-150.0, 150.0, 125.0], [150.0, 150.0, 125.0]]
)
KPS5_MODEL_3D = _GENERIC_KPS5 @ _TILT_MATRIX.T


def solve_pose(
    points: np.ndarray, image_size: tuple[int, int], model: np.ndarray = FACE_MODEL_3D
) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the `model` points (FACE_MODEL_3D or KPS5_MODEL_3D) seen at `points`.

    The camera is a pinhole with focal length max(width, height) whose optical axis passes through the
    face (principal point at the points' centre), so the angles are relative to the line of sight: a face
    looking into the lens has yaw = pitch = 0 wherever it sits in the frame.
    """
    focal = float(max(image_size))
    image_points = np.asarray(points, dtype=np.float64).reshape(len(model), 1, 2)
    cx, cy = image_points.reshape(-1, 2).mean(0)
    camera = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], dtype=np.float64)
    ok, rvec, _ = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise ValueError("head pose: solvePnP found no solution for these landmarks")
    rotation, _ = cv2.Rodrigues(rvec)
    facing = rotation @ np.array([0.0, 0.0, -1.0])  # towards the camera for a frontal face
    eye_line = rotation @ np.array([1.0, 0.0, 0.0])
    yaw = math.degrees(math.atan2(facing[0], -facing[2]))
    pitch = math.degrees(math.atan2(-facing[1], math.hypot(facing[0], facing[2])))
    roll = math.degrees(math.atan2(eye_line[1], eye_line[0]))
    return yaw, pitch, roll
