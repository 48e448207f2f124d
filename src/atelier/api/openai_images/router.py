"""Routes of the openai_images door (thin: parse, call the service, return)."""

from fastapi import APIRouter

router = APIRouter()
