"""Running fedseg across real sites: certificates, the server and site launch commands."""
