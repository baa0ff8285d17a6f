DROP TABLE messages;
DROP TABLE members;
DROP TABLE chat_groups;
DROP TABLE conversations;
DROP TABLE users;
