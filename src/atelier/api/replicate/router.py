"""Routes of the replicate door (thin: parse, call the service, return)."""

from fastapi import APIRouter

router = APIRouter()
