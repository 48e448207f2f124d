"""Routes of the cog door (thin: parse, call the service, return)."""

from fastapi import APIRouter

router = APIRouter()
