USERS = {}


def register(email, name):
    key = email.strip().lower()
    USERS[key] = name
    return key


def find(email):
    key = email.strip().lower()
    return USERS.get(key)
