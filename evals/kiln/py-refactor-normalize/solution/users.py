USERS = {}


def normalize_email(addr):
    return addr.strip().lower()


def register(email, name):
    key = normalize_email(email)
    USERS[key] = name
    return key


def find(email):
    return USERS.get(normalize_email(email))
